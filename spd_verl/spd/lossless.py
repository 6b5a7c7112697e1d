"""Lossless continuations without speculating: the target's own greedy decoding. No verl imports.

Lossless SD (``RejectAll``) emits exactly the target's greedy text; speculating pays only when a
target forward costs far more than γ draft forwards. On the demo world's tiny models a draft
forward costs about half a target one, so the target alone decodes the same text 1.17-1.38x faster
(benchmarks/bench_lossless.py; README: Engine speed). The per-decision credit's branches and the swap proxy's single swaps need
only that text and the target's log-probs; for the ``gated`` reward the credit also needs how many
mismatches lossless SD would have met on the way, which :func:`replay_lossless` counts from one
teacher-forced draft forward: with a greedy draft, a proposal at a position is the draft's argmax
after the target's own prefix, so the blocks of lossless SD can be walked without decoding.

Same outputs as the engine up to floating-point ties: the target scores one token per forward here
and a block per forward there (log-probs agree to ~1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import SlotCache, left_pad


@dataclass
class LosslessResult:
    """responses: the target's greedy continuation of each prompt; target_logprobs: its log-prob of
    each emitted token (aligned with responses); mismatches / target_forwards: what lossless SD at
    γ would have counted for that text (``DecisionRecord.mismatches`` / ``.target_forwards``)."""

    responses: list[list[int]]
    target_logprobs: list[list[float]]
    mismatches: list[int]
    target_forwards: list[int]


@torch.no_grad()
def target_greedy(target, prompts: list[list[int]], limits: list[int], eos: set[int],
                  preallocate_cache: bool = True) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy decoding of ``prompts`` (left-padded into one batch) by ``target`` alone, each row up
    to its limit or its first EOS. Returns (responses, target log-prob of every emitted token)."""
    dev = next(target.parameters()).device
    ids, valid = left_pad(prompts, dev)
    cache = SlotCache(target, len(prompts), dev, preallocate_cache)
    logits = cache.forward(ids, valid).logits[:, -1]
    responses: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # batch row -> prompt index
    while True:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = logp.argmax(dim=-1)
        tok_lp = logp.gather(1, tok[:, None]).squeeze(1)
        keep = []
        for i, (b, t, lp) in enumerate(zip(active, tok.tolist(), tok_lp.tolist())):
            responses[b].append(t)
            logprobs[b].append(lp)
            if t not in eos and len(responses[b]) < limits[b]:
                keep.append(i)
        if not keep:
            return responses, logprobs
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=dev)
            cache.select_rows(rows)
            tok, active = tok[rows], [active[i] for i in keep]
        logits = cache.forward(tok[:, None], torch.ones(len(active), 1, dtype=torch.bool, device=dev)).logits[:, -1]


@torch.no_grad()
def replay_lossless(draft, prompts: list[list[int]], responses: list[list[int]], gamma: int,
                    batch_size: int = 256) -> tuple[list[int], list[int]]:
    """(mismatches, target forwards) per row that lossless SD with a greedy draft at ``gamma`` reports
    when it emits ``responses`` (the target's greedy continuations of ``prompts``).

    Per block from response position s: the draft proposes its argmax after the target's prefix as
    long as it agrees with the response; the first disagreement at s + k is a mismatch, and the block
    emits k + 1 tokens (γ + 1, the bonus token, when all γ agree); a response that ends inside a block
    ends it. One forward of the draft per row (right-padded batches)."""
    dev = next(draft.parameters()).device
    mismatches, forwards = [], []
    for lo in range(0, len(prompts), batch_size):
        seqs = [list(p) + list(r) for p, r in zip(prompts[lo:lo + batch_size], responses[lo:lo + batch_size])]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
        mask = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, :len(s)] = 1
        preds = draft(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1).tolist()
        for b, (p, r) in enumerate(zip(prompts[lo:lo + batch_size], responses[lo:lo + batch_size])):
            agree = [preds[b][len(p) - 1 + k] == t for k, t in enumerate(r)]  # the draft's proposal at k is r[k]
            s, m, f = 0, 0, 0
            while s < len(r):
                f += 1
                k = next((j for j in range(min(gamma, len(r) - s)) if not agree[s + j]), None)
                if k is None:
                    s += gamma + 1
                else:
                    m += 1
                    s += k + 1
            mismatches.append(m)
            forwards.append(f)
    return mismatches, forwards
