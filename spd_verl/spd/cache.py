"""A KV cache for ragged speculative decoding: slots that can be invalidated in place.

Rows of a batch keep different numbers of tokens per block. Instead of cropping (which only
works when every row rolls back by the same amount) each slot of the shared Hugging Face
``DynamicCache`` carries a validity bit per row; a rolled-back slot is masked forever and the
logical position of a token is the number of valid slots before it, so rotary positions stay
exact. ``compact`` squeezes the holes out when they start to cost attention time.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class SlotCache:
    def __init__(self, model, batch_size: int, device: torch.device):
        self.model = model
        self.kv = DynamicCache(config=model.config)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def forward(self, tokens: torch.Tensor, token_valid: torch.Tensor, **model_kwargs):
        """Append ``tokens`` [B, W] (``token_valid`` [B, W] marks real ones) and run the model.

        Returns the model output; logits/hidden states are [B, W, ...] aligned with ``tokens``.
        """
        past = self.length
        positions = self.valid.sum(dim=1, keepdim=True) + token_valid.long().cumsum(dim=1) - 1
        positions = positions.clamp_min(0)  # invalid leading tokens: any position, never attended
        keys_valid = torch.cat([self.valid, token_valid], dim=1)  # [B, past + W]
        width = tokens.shape[1]
        q_index = torch.arange(width, device=tokens.device)[:, None] + past
        k_index = torch.arange(past + width, device=tokens.device)[None, :]
        allowed = (k_index <= q_index)[None] & keys_valid[:, None, :]
        # An invalid query with no valid key would produce NaN states that then poison every
        # later read of its slot (0 * NaN); letting it see itself keeps all states finite.
        allowed = allowed | (k_index == q_index)[None]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=tokens.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask[:, None],
            position_ids=positions,
            past_key_values=self.kv,
            use_cache=True,
            **model_kwargs,
        )
        self.valid = keys_valid
        return out

    def invalidate(self, start: int, keep: torch.Tensor) -> None:
        """Of the slots from ``start`` on, keep the first ``keep[b]`` of row b; drop the rest."""
        idx = torch.arange(self.length - start, device=self.valid.device)[None, :]
        tail = self.valid[:, start:] & (idx < keep[:, None])
        self.valid = torch.cat([self.valid[:, :start], tail], dim=1)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.kv.batch_select_indices(rows)
        self.valid = self.valid[rows]

    def maybe_compact(self, slack: float = 2.0) -> None:
        """Gather each row's valid slots to the right end (left padding) once holes dominate."""
        counts = self.valid.sum(dim=1)
        new_len = int(counts.max().item()) if counts.numel() else 0
        if self.length <= slack * new_len + 16:
            return
        # Stable order of valid slots per row, right-aligned.
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)[:, :new_len]
        pad = new_len - counts  # [B]
        col = torch.arange(new_len, device=self.valid.device)[None, :]
        src = torch.gather(order, 1, (col - pad[:, None]).clamp_min(0))
        new_valid = col >= pad[:, None]
        for layer in self.kv.layers:
            index = src[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.gather(layer.keys, 2, index)
            layer.values = torch.gather(layer.values, 2, index)
        self.valid = new_valid
