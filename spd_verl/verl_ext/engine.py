"""Decision-level actor: verl's FSDP engine training the judge (ScoringModel) instead of an LM.

Registered in verl's EngineRegistry as model_type ``spd_scoring`` (select it with
``actor_rollout_ref.model.model_type=spd_scoring``). Only the model's inputs and outputs change:

- inputs: the rollout's candidate tokens and free features (``spd_*`` batch fields, aligned with
  ``responses``) are laid out over the full sequence like ``input_ids`` (zeros over the prompt)
  and passed to the model next to the tokens;
- outputs: in place of token log-probs/entropy the engine returns, at the index where verl keeps
  the log-prob of token k (k − 1, i.e. shifted like labels), the log-prob of the stored
  accept/reject action under σ(logit / T) and the Bernoulli entropy.

verl's ppo_loss, KL, entropy and GRPO advantage then run unchanged, masked by the decision mask
(the ``response_mask`` of the spd agent loop). The reference policy is LoRA disabled — note that
with peft ``modules_to_save`` that is also the original (untrained) score head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from verl.utils import tensordict_utils as tu
from verl.utils.torch_dtypes import PrecisionType
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp import FSDPEngineWithLMHead

from ..scoring_model import decision_log_probs
from ..spd.policies import NUM_FEATURES
from .judge import HEAD_NAME, MODEL_KEY, build_judge, head_lr_mult, wrap_lora
from .keys import SIDE_FIELDS

MODEL_TYPE = "spd_scoring"


def _lengths(t: torch.Tensor) -> list[int]:
    if t.is_nested:
        return t.offsets().diff().tolist()
    return [t.shape[1]] * t.shape[0]


def fit_to_length(row: torch.Tensor, length: int) -> torch.Tensor:
    """Truncate/zero-pad a per-response row to ``length`` (verl's padding samples copy the side
    tensors of a real sample but have a 1-token response; their decision mask is 0)."""
    if row.shape[0] >= length:
        return row[:length]
    pad = row.new_zeros((length - row.shape[0], *row.shape[1:]))
    return torch.cat([row, pad])


@EngineRegistry.register(model_type=MODEL_TYPE, backend=["fsdp", "fsdp2"], device=["cuda", "npu", "cpu"])
class SPDScoringEngine(FSDPEngineWithLMHead):
    """FSDP engine whose "log-probs" are the judge's decision log-probs."""

    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config):
        super().__init__(model_config, engine_config, optimizer_config, checkpoint_config)
        if self.ulysses_sequence_parallel_size > 1:
            raise ValueError("the spd_scoring engine does not support Ulysses sequence parallelism "
                             "(decision logits read the previous position's hidden state)")
        if model_config.use_fused_kernels:
            raise ValueError(f"{MODEL_KEY}.use_fused_kernels fuses the LM head's log-softmax; the judge has no LM "
                             f"head: set it to false")
        self.head_lr_mult = head_lr_mult(model_config)  # a bad value fails here, before any weights load
        attn = dict(model_config.override_config or {}).get("attn_implementation", "flash_attention_2")
        if self.use_remove_padding and not str(attn).startswith("flash"):
            # Packed (remove-padding) batches rely on varlen attention; with sdpa/eager the packed
            # sequences attend to each other and every log-prob is silently wrong.
            raise ValueError(f"{MODEL_KEY}.use_remove_padding=True needs a varlen attention "
                             f"(flash_attention_2); with attn_implementation={attn!r} set "
                             f"{MODEL_KEY}.use_remove_padding=False")

    # ------------------------------------------------------------------ model
    def _build_module(self):
        dtype = self.engine_config.model_dtype or ("fp32" if not self.engine_config.forward_only else "bf16")
        module = build_judge(self.model_config, dtype=PrecisionType.to_dtype(dtype))
        if self.model_config.enable_gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return module

    def _build_optimizer(self, module):
        """verl's optimizer, with the score head in its own parameter group when
        ``override_config.head_lr_mult`` != 1: the head (one Linear over the context state, the
        candidates and the free features) sets how far every accept probability moves per step,
        while the LoRA adapters shape what the context state says."""
        from verl.workers.config.optimizer import build_optimizer

        mult = self.head_lr_mult
        if mult == 1.0:
            return super()._build_optimizer(module)
        head, rest = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                (head if HEAD_NAME in name.split(".") else rest).append(param)
        if not head:
            raise ValueError(f"{MODEL_KEY}.override_config.head_lr_mult={mult} but the judge has no trainable "
                             f"{HEAD_NAME!r} parameter")
        groups = [{"params": rest}, {"params": head, "lr": self.optimizer_config.lr * mult}]
        return build_optimizer(groups, self.optimizer_config)

    def _build_lora_module(self, module):
        module.enable_input_require_grads()
        return wrap_lora(module, self.model_config)

    # ------------------------------------------------------------------ inputs
    def _full_sequence_fields(self, micro_batch) -> dict[str, list[torch.Tensor]]:
        """Per sample, each side field over the whole sequence: zeros over the prompt, then the
        response part, so index k holds the candidates for token k."""
        missing = [k for k in SIDE_FIELDS if k not in micro_batch.keys()]
        if missing:
            raise KeyError(f"the {MODEL_TYPE} engine needs the batch fields {missing}; they come from the "
                           f"spd rollout with the spd_agent agent loop")
        seq_lens = _lengths(micro_batch["input_ids"])
        resp_lens = _lengths(micro_batch["responses"])
        out = {}
        for key in SIDE_FIELDS:
            rows = micro_batch[key].unbind(0)
            full = []
            for row, seq_len, resp_len in zip(rows, seq_lens, resp_lens, strict=True):
                row = fit_to_length(row, resp_len)
                prompt = row.new_zeros((seq_len - resp_len, *row.shape[1:]))
                full.append(torch.cat([prompt, row]))
            out[key] = full
        return out

    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        fields = self._full_sequence_fields(micro_batch)
        use_rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        if use_rmpad:
            pad = output_args.get("pad_size", 0)
            laid_out = {}
            for key, rows in fields.items():
                packed = torch.cat(rows)
                if pad:
                    packed = torch.cat([packed, packed.new_zeros((pad, *packed.shape[1:]))])
                laid_out[key] = packed.unsqueeze(0)  # (1, total_nnz [+ pad], ...)
        else:
            laid_out = {k: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True) for k, rows in fields.items()}
        model_inputs.update(draft_tokens=laid_out["spd_draft_tokens"], target_tokens=laid_out["spd_target_tokens"],
                            features=laid_out["spd_features"].reshape(*laid_out["spd_draft_tokens"].shape,
                                                                      NUM_FEATURES))
        output_args["spd_actions"] = laid_out["spd_actions"]
        return model_inputs, output_args

    # ------------------------------------------------------------------ outputs
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        use_rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        input_ids = micro_batch["input_ids"]
        cu_seqlens = input_ids.offsets()
        actions = output_args["spd_actions"]
        logits = output.logits.float()
        if use_rmpad:
            temperature = output_args["temperature_rmpad"].to(logits.dtype)  # (total_nnz [+ pad],)
            logp, entropy = decision_log_probs(logits.squeeze(0) / temperature.clamp(min=1e-8), actions.squeeze(0))
            # Token k's decision moves to index k - 1 (verl's log-prob layout); the value rolled
            # into each sequence's last index belongs to the next sequence and is never read.
            nnz = int(cu_seqlens[-1])
            logp, entropy = torch.roll(logp, -1)[:nnz], torch.roll(entropy, -1)[:nnz]
        else:
            temperature = output_args["temperature"].to(logits.dtype).clamp(min=1e-8)[:, None]  # (bsz, 1)
            logp, entropy = decision_log_probs(logits / temperature, actions)
            logp, entropy = F.pad(logp[:, 1:], (0, 1)), F.pad(entropy[:, 1:], (0, 1))
            lengths = cu_seqlens.diff().tolist()
            logp = torch.cat([row[:n] for row, n in zip(logp, lengths)])
            entropy = torch.cat([row[:n] for row, n in zip(entropy, lengths)])
        model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(logp, cu_seqlens)}
        if calculate_entropy:
            model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, cu_seqlens)
        return model_output

    def forward_step(self, micro_batch, loss_function, forward_only):
        # A mini-batch without a single decision would make verl's token-mean loss 0/0 = NaN;
        # with a count of 1 its (all-masked) loss is exactly 0 and gives no gradient.
        if loss_function is not None and tu.get_non_tensor_data(micro_batch, "batch_num_tokens", None) == 0:
            tu.assign_non_tensor(micro_batch, batch_num_tokens=1)
        return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
