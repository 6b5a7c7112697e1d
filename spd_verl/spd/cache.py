"""A KV cache for ragged speculative decoding: slots that can be invalidated in place.

Rows of a batch keep different numbers of tokens per block. Instead of cropping (which only
works when every row rolls back by the same amount) each slot of the shared Hugging Face
``DynamicCache`` carries a validity bit per row; a rolled-back slot is masked forever and the
logical position of a token is the number of valid slots before it, so rotary positions stay
exact. ``compact`` squeezes the holes out when they start to cost attention time.

By default each layer appends in place into preallocated buffers (``GrowingLayer``) instead of
Hugging Face's ``torch.cat`` per forward, which copies the whole cache every forward (O(L²) per
decode: it was the largest cost after the matmuls on CPU). Outputs are bit-identical either way.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _capacity(slots: int, device: torch.device) -> int:
    """Slots to allocate for ``slots`` live ones. Geometric growth: O(log L) regrowths per decode.
    On CPU, pages are only mapped when first written, so unwritten room costs address space but
    neither memory nor time, while a regrowth copies into fresh pages (a page fault per 4 KiB, many
    times the copy itself): reserve generously there. Elsewhere keep memory within 2x."""
    return max(4 * slots, 1024) if device.type == "cpu" else max(2 * slots, 64)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views ``buf[:, :, :n]`` of buffers with spare
    room along the sequence: a forward writes only its own W slots, and attention gets exactly the
    n valid ones (sdpa reads the strided view directly, bit-identical to a contiguous copy).

    Row removal and compaction copy the live slots into the *other* buffer pair and swap (on CPU):
    writing freshly allocated memory costs a page fault per 4 KiB, several times the copy itself
    (measured 5-10x), and the previous pair's pages are already mapped. On accelerators the caching
    allocator recycles memory anyway, so no spare pair is kept there.

    Base-class methods that only shorten the view (``crop``) keep working as is; any that replace
    ``keys`` with a new tensor (reorder, repeat_interleave) are adopted at the next update, at the
    cost of one copy.
    """

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = self._spare = None

    def _owns_view(self) -> bool:
        return (self._k is not None and self.keys.dim() == 4 and self.keys.data_ptr() == self._k.data_ptr()
                and self.keys.shape[0] == self._k.shape[0])

    def _empty(self, batch: int, capacity: int):
        """Buffers for ``batch`` rows and at least ``capacity`` slots: the spare pair if it fits."""
        if self._spare is not None and self._spare[0].shape[0] >= batch and self._spare[0].shape[2] >= capacity:
            return self._spare[0][:batch], self._spare[1][:batch]
        keys, values = self.keys, self.values
        return (keys.new_empty(batch, keys.shape[1], capacity, keys.shape[3]),
                values.new_empty(batch, values.shape[1], capacity, values.shape[3]))

    def _install(self, k, v, n: int) -> None:
        """Make ``k``/``v`` (first ``n`` slots live) the buffers; the old pair becomes the spare."""
        self._spare = (self._k, self._v) if self._k is not None and self._k.device.type == "cpu" else None
        self._k, self._v = k, v
        self.keys, self.values = k[:, :, :n], v[:, :, :n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, w = self.get_seq_length(), key_states.shape[-2]
        if not self._owns_view() or n + w > self._k.shape[2]:  # first call, full, or adopted
            if n == 0:  # lazy_initialization's placeholders are 1-D
                self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            k, v = self._empty(key_states.shape[0], _capacity(n + w, key_states.device))
            k[:, :, :n], v[:, :, :n] = self.keys, self.values
            self._install(k, v, n)
        self._k[:, :, n:n + w] = key_states
        self._v[:, :, n:n + w] = value_states
        self.keys, self.values = self._k[:, :, :n + w], self._v[:, :, :n + w]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # The base class would index into a new contiguous tensor (copied again at the next
        # update); copy only the live slots of the kept rows, straight into the other buffers.
        n = self.get_seq_length()
        if n == 0 or not self._owns_view():
            return super().batch_select_indices(indices)
        k, v = self._empty(len(indices), self._k.shape[2])
        torch.index_select(self.keys, 0, indices, out=k[:, :, :n])
        torch.index_select(self.values, 0, indices, out=v[:, :, :n])
        self._install(k, v, n)

    def gather_slots(self, index: torch.Tensor) -> None:
        """keys/values <- their ``gather(2, index)`` (index [B, H, n', D]), into the other buffers."""
        n = index.shape[2]
        k, v = self._empty(index.shape[0], _capacity(n, index.device))
        torch.gather(self.keys, 2, index, out=k[:, :, :n])
        torch.gather(self.values, 2, index, out=v[:, :, :n])
        self._install(k, v, n)


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids [B, L], valid [B, L]), left-padded: every row's last token in the last column."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, L - len(p):] = True
    return ids, valid


class SlotCache:
    def __init__(self, model, batch_size: int, device: torch.device, preallocate: bool = True):
        """``preallocate=False`` keeps Hugging Face's plain ``DynamicLayer`` (for comparison)."""
        self.model = model
        self.kv = DynamicCache(config=model.config)
        if preallocate:  # only full-attention layers; others (e.g. sliding windows) stay as they are
            self.kv.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.kv.layers]
            if self.kv.layer_class_to_replicate is DynamicLayer:
                self.kv.layer_class_to_replicate = GrowingLayer
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
            if isinstance(layer, GrowingLayer):
                layer.gather_slots(index)
            else:
                layer.keys = torch.gather(layer.keys, 2, index)
                layer.values = torch.gather(layer.values, 2, index)
        self.valid = new_valid
