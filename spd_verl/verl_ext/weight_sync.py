"""Load the actor's weight syncs into the rollout server's judge.

verl's FSDP engine sends, depending on ``actor_rollout_ref.model.lora.merge`` and the sync phase:

- adapter-only (merge=False, every step): peft adapter state-dict names
  (``base_model.model.<path>.lora_A.weight``, ``base_model.model.score_head.weight`` for the fully
  trained head) — loaded with peft's own ``set_peft_model_state_dict``;
- base weights (merge=False, once, only with ``rollout.load_format=dummy``): module names of the
  peft-wrapped model without the ``base_model.model.`` prefix;
- merged (merge=True): normalised peft names of the merged model, where the trained head appears
  as ``score_head.modules_to_save.default.*`` next to the untouched ``score_head.original_module.*``
  (verl casts merged FSDP tensors to bf16 on the way).

Every name must land somewhere: unknown names and shape mismatches are errors.
"""

from __future__ import annotations

import torch

MODEL_KEY = "actor_rollout_ref.model"


@torch.no_grad()
def load_synced_weights(judge, named: dict, peft_config=None, base_sync_done: bool = True,
                        merged: bool = False) -> None:
    if not named:
        return
    if merged:
        if peft_config is not None:
            raise ValueError(f"got LoRA adapter weights but {MODEL_KEY}.lora.merge=True: the server expects "
                             f"merged weights")
        _load_by_name(judge, named, merged=True)
    elif peft_config is not None and base_sync_done:
        _load_adapter(judge, named)
    else:
        _load_by_name(judge, named, merged=False)


def _load_adapter(judge, named: dict) -> None:
    from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict

    if not hasattr(judge, "peft_config"):
        raise ValueError(f"got LoRA adapter weights but the server's judge has no LoRA ({MODEL_KEY}.lora_rank=0?)")
    expected = set(get_peft_model_state_dict(judge))
    unknown = sorted(set(named) - expected)
    if unknown:
        raise ValueError(f"adapter sync has {len(unknown)} names the judge does not have, e.g. {unknown[:3]}; "
                         f"do the actor and the server use the same LoRA settings?")
    device = next(judge.parameters()).device
    set_peft_model_state_dict(judge, {k: v.to(device) for k, v in named.items()})


def _load_by_name(judge, named: dict, merged: bool) -> None:
    params = judge.state_dict()
    resolved, unknown = {}, []
    for name, tensor in named.items():
        key = _resolve(name, params, merged)
        if key is False:
            continue
        if key is None:
            unknown.append(name)
        else:
            resolved[key] = tensor
    if unknown:
        raise ValueError(f"weight sync has {len(unknown)} names the judge does not have, e.g. {unknown[:3]}")
    for key, tensor in resolved.items():
        if params[key].shape != tensor.shape:
            raise ValueError(f"weight sync: {key} has shape {tuple(tensor.shape)}, "
                             f"the judge expects {tuple(params[key].shape)}")
        params[key].copy_(tensor.to(params[key].dtype))


def _resolve(name: str, params: dict, merged: bool):
    """Judge state-dict key for a synced name; False = deliberately skipped; None = unknown."""
    if merged:
        if ".original_module." in name or "lora_" in name:
            return False  # the untrained head copy / leftover adapter tensors
        name = name.replace("base_model.model.", "").replace(".modules_to_save.default.", ".")
        return name if name in params else None
    for key in (name, f"base_model.model.{name}"):
        if key in params:
            return key
    return None
