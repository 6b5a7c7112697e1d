"""Build the judge from verl's model config — the one recipe shared by the actor engine and the
rollout server, so both start from identical weights and identical LoRA parameter names.

``actor_rollout_ref.model.path`` is either a Llama-family checkpoint (a fresh judge: backbone from
it, LM head dropped, score head at ``init_accept_prob``) or an exported judge (``spd_scoring``
config, e.g. a previous run's ``judge`` export). Judge head settings are ScoringConfig fields and
are set like any Hugging Face config field, through ``actor_rollout_ref.model.override_config``
(``init_accept_prob``, ``num_features``). ``head_lr_mult`` there (default 1) gives the actor's
score head its own learning rate, as a multiple of the optimizer's.
"""

from __future__ import annotations

import math

import torch

from ..scoring_model import ScoringConfig, ScoringModel, add_lora
from ..spd.policies import NUM_FEATURES

MODEL_KEY = "actor_rollout_ref.model"
HEAD_NAME = "score_head"  # ScoringModel's head attribute (peft keeps it under this name too)


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def build_judge(model_config, dtype: torch.dtype = torch.float32) -> ScoringModel:
    """``model_config``: verl HFModelConfig (dataclass) of the actor."""
    override = dict(_get(model_config, "override_config", {}) or {})
    attn = override.get("attn_implementation", "sdpa")
    path = model_config.local_path or model_config.path
    hf_config = model_config.hf_config
    if getattr(hf_config, "model_type", None) == ScoringConfig.model_type:
        return ScoringModel.from_pretrained(path, config=hf_config, dtype=dtype, attn_implementation=attn)
    return ScoringModel.from_backbone(
        path,
        init_accept_prob=float(override.get("init_accept_prob", 0.5)),
        num_features=int(override.get("num_features", NUM_FEATURES)),
        dtype=dtype,
        attn_implementation=attn,
    )


def head_lr_mult(model_config) -> float:
    """``override_config.head_lr_mult`` (default 1): the score head's lr over the optimizer's."""
    override = dict(_get(model_config, "override_config", {}) or {})
    value = override.get("head_lr_mult", 1.0)
    try:
        mult = float(value)
    except (TypeError, ValueError):
        mult = None
    if mult is None or not math.isfinite(mult) or mult <= 0:
        raise ValueError(f"{MODEL_KEY}.override_config.head_lr_mult must be a positive number, got {value!r}")
    return mult


def lora_settings(model_config) -> dict | None:
    """The actor's LoRA (rank, alpha, target_modules), or None without LoRA."""
    rank = int(_get(model_config, "lora_rank", 0))
    if rank <= 0:
        return None
    if _get(model_config, "exclude_modules") is not None:
        raise ValueError(f"{MODEL_KEY}.exclude_modules is not supported for the judge; "
                         f"list the modules to adapt in {MODEL_KEY}.target_modules instead")
    target = _get(model_config, "target_modules", "all-linear")
    if not isinstance(target, str):
        target = list(target)
    return dict(rank=rank, alpha=int(_get(model_config, "lora_alpha", 16)), target_modules=target)


def wrap_lora(judge: ScoringModel, model_config):
    """LoRA on the backbone + a fully trained score head (peft ``modules_to_save``), as the actor
    trains it; a pre-trained adapter (``lora_adapter_path``) is loaded instead when given."""
    adapter_path = _get(model_config, "lora_adapter_path")
    if adapter_path is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(judge, adapter_path, is_trainable=True)
    settings = lora_settings(model_config)
    if settings is None:
        return judge
    return add_lora(judge, **settings)


def lora_merged(model_config) -> bool:
    """verl's ``model.lora.merge``: weight syncs send merged weights instead of adapters."""
    lora = _get(model_config, "lora", {}) or {}
    return bool(lora.get("merge", False))
