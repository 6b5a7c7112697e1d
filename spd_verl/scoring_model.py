"""ScoringModel: the judge. A Llama-family backbone (no LM head) + one linear score head.

Decision logit contract (DESIGN.md §4): the logit of the decision at sequence position ``i`` is a
function of the backbone hidden state at ``i - 1`` (the context, identical in the rollout and in
the final sequence, whatever was decided at ``i``) and of the candidate tokens ``d_i`` (draft) and
``t_i`` (target) plus the free features of verification. Hence one forward over a finished
sequence reproduces every decision logit it contains, and

    log π(accept | s) = log σ(logit),   log π(reject | s) = log σ(-logit).

No framework imports beyond transformers/peft: verl wiring lives in ``spd_verl.verl_ext``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from .spd.policies import NUM_FEATURES

LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ScoringConfig(LlamaConfig):
    """A Llama config plus the judge's head settings.

    num_features: free verification features fed to the head (spd.FEATURE_NAMES; 0 disables).
    init_accept_prob: P(accept) of the untrained judge (the head starts at zero weights with
        bias logit(init_accept_prob), so every decision starts exactly there).
    """

    model_type = "spd_scoring"

    def __init__(self, num_features: int = NUM_FEATURES, init_accept_prob: float = 0.5, **kwargs):
        if not 0.0 < float(init_accept_prob) < 1.0:
            raise ValueError(f"init_accept_prob must be in (0, 1), got {init_accept_prob!r}")
        if int(num_features) < 0:
            raise ValueError(f"num_features must be >= 0, got {num_features!r}")
        self.num_features = int(num_features)
        self.init_accept_prob = float(init_accept_prob)
        super().__init__(**kwargs)


@dataclass
class ScoringOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, T] decision logits (0 where no candidates given)
    last_hidden_state: torch.Tensor | None = None  # [B, T, H]
    past_key_values: object | None = None


class ScoringModel(LlamaPreTrainedModel):
    config_class = ScoringConfig
    base_model_prefix = "model"

    def __init__(self, config: ScoringConfig):
        super().__init__(config)
        self.model = LlamaModel(config)  # same attribute name as LlamaForCausalLM: draft weights load as is
        h = config.hidden_size
        # Context h, candidate embeddings e_d, e_t, and their products with h (a bilinear
        # context x candidate interaction that a single linear layer can still express).
        self.score_head = nn.Linear(5 * h + config.num_features, 1)
        self.post_init()

    def _init_weights(self, module):
        if module is getattr(self, "score_head", None):
            p = self.config.init_accept_prob
            init.zeros_(module.weight)
            init.constant_(module.bias, math.log(p / (1.0 - p)))
        else:
            super()._init_weights(module)

    def reset_head(self) -> None:
        with torch.no_grad():
            p = self.config.init_accept_prob
            self.score_head.weight.zero_()
            self.score_head.bias.fill_(math.log(p / (1.0 - p)))

    @classmethod
    def from_backbone(cls, path_or_model, init_accept_prob: float = 0.5, num_features: int = NUM_FEATURES,
                      **kwargs) -> "ScoringModel":
        """A fresh judge on a Llama-family checkpoint (path or loaded model); its LM head is dropped."""
        if isinstance(path_or_model, (str, Path)):
            base_cfg = AutoConfig.from_pretrained(path_or_model)
            cfg = ScoringConfig(num_features=num_features, init_accept_prob=init_accept_prob,
                                **_backbone_fields(base_cfg))
            model = cls.from_pretrained(path_or_model, config=cfg, **kwargs)
        else:
            cfg = ScoringConfig(num_features=num_features, init_accept_prob=init_accept_prob,
                                **_backbone_fields(path_or_model.config))
            model = cls(cfg)
            backbone = getattr(path_or_model, "model", path_or_model)
            model.model.load_state_dict(backbone.state_dict())
        model.reset_head()
        return model

    def head_logits(self, hidden: torch.Tensor, draft_tokens: torch.Tensor, target_tokens: torch.Tensor,
                    features: torch.Tensor | None) -> torch.Tensor:
        """hidden [..., H] (context states), draft/target tokens [...], features [..., F] -> logits [...]."""
        emb = self.model.embed_tokens
        e_d, e_t = emb(draft_tokens), emb(target_tokens)
        parts = [hidden, e_d, e_t, hidden * e_d, hidden * e_t]
        if self.config.num_features:
            if features is None:
                raise ValueError(f"this judge takes {self.config.num_features} free features but none were given")
            parts.append(features[..., : self.config.num_features].to(hidden.dtype))
        return self.score_head(torch.cat(parts, dim=-1)).squeeze(-1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, draft_tokens=None, target_tokens=None, features=None, **kwargs) -> ScoringOutput:
        """input_ids [B, T]; draft_tokens/target_tokens [B, T] and features [B, T, F] aligned with the
        input (the candidates *for* each position). logits[:, i] uses the context state at i - 1;
        logits[:, 0] is 0 (no context in this call). Positions that are not decisions may hold
        any token id (ignored values are replaced by 0 before the embedding lookup)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        logits = None
        if draft_tokens is not None:
            if target_tokens is None:
                raise ValueError("draft_tokens given without target_tokens")
            ctx = hidden[:, :-1]
            d = draft_tokens[:, 1:].clamp_min(0)  # padding ids (-1/-100) are not decisions
            t = target_tokens[:, 1:].clamp_min(0)
            f = features[:, 1:] if features is not None else None
            logits = F.pad(self.head_logits(ctx, d, t, f), (1, 0))
        return ScoringOutput(logits=logits, last_hidden_state=hidden, past_key_values=out.past_key_values)

    def decision_logits(self, input_ids, draft_tokens, target_tokens, features=None, attention_mask=None,
                        position_ids=None) -> torch.Tensor:
        """Every decision logit of a batch of finished sequences in one forward: [B, T]."""
        return self.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            draft_tokens=draft_tokens, target_tokens=target_tokens, features=features,
                            use_cache=False).logits


def _backbone_fields(cfg) -> dict:
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map", "num_features",
              "init_accept_prob", "_name_or_path"):
        d.pop(k, None)
    return d


def decision_log_probs(logits: torch.Tensor, actions: torch.Tensor):
    """Bernoulli policy: logits, actions (1 accept / 0 reject) [...] -> (log π(a|s), entropy) [...]."""
    logits = logits.float()
    logp = -F.binary_cross_entropy_with_logits(logits, actions.float(), reduction="none")
    p = torch.sigmoid(logits)
    entropy = F.binary_cross_entropy_with_logits(logits, p, reduction="none")
    return logp, entropy


# ---------------------------------------------------------------- LoRA and export (peft)
def lora_target_modules(model: ScoringModel, target_modules) -> list[str]:
    """peft target modules; "all-linear" means the backbone's linear layers, never the score head."""
    if target_modules in (None, "all-linear"):
        names = {n.split(".")[-1] for n, m in model.model.named_modules() if isinstance(m, nn.Linear)}
        return sorted(names)
    return list(target_modules)


def add_lora(model: ScoringModel, rank: int = 64, alpha: int = 32, target_modules="all-linear",
             dropout: float = 0.0):
    """Wrap the judge with LoRA: only LoRA A/B and the (fully trained) score head are trainable."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=lora_target_modules(model, target_modules), modules_to_save=["score_head"])
    return get_peft_model(model, cfg)


def export_judge(model, out_dir) -> Path:
    """Hugging Face export: ``out_dir`` holds the merged ScoringModel (loads with
    ``ScoringModel.from_pretrained`` / ``AutoModel`` after ``import spd_verl.scoring_model``) and,
    for a PEFT judge, ``out_dir/adapter`` the adapter + head alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(out / "adapter")
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    merged.save_pretrained(out)
    return out


def load_judge(path, **kwargs) -> ScoringModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no judge at {path}: expected a ScoringModel export with config.json")
    return ScoringModel.from_pretrained(path, **kwargs).eval()


AutoConfig.register(ScoringConfig.model_type, ScoringConfig)
AutoModel.register(ScoringConfig, ScoringModel)
