"""The swap proxy: rank a run's saved judges without decoding with them, to choose which to calibrate.

Calibrating one judge (spd-train's threshold choice, ``calibrate.py``) decodes the calib split some
25 times, minutes on a CPU, so a run can afford to calibrate one or two of its judges; yet how well
a judge ranks moves a lot along a run (README: Results, session 21: the judge of session 20's
fresh-clone demo gave 1.15x at step 60 and 1.35x at step 30). The proxy costs one forward per
problem per judge, over a bank built once:

- **bank** (:func:`build_swap_bank`): lossless SD over held-in problems; every mismatch it meets,
  with the judge's inputs there (context, draft and target tokens, free features) and the draft
  tokens an accept keeps (``runs``); and for each, the **single swap**: the lossless prefix with the
  draft's token in place of the target's, continued losslessly. ``harmful`` = the lossless answer
  is right and the swapped one is not.
- **score** (:func:`swap_score`): sort the bank's mismatches by the judge's logit, highest first,
  and walk down: G(h) = the draft tokens kept by the harmless swaps accepted before the (h+1)-th
  harmful one, over all harmless swaps' tokens. The score is the mean of G(h) for h = 0 ..
  ``budget`` (a fraction of the bank's problems): how much a threshold buys before it starts
  losing answers, read where the calibration's bar sits.

What it cannot see: harm that builds up over several accepts (each swap is judged in the lossless
context), so it ranks judges for a calibration to measure, and never replaces one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..reward import is_correct
from ..spd import RejectAll, SpeculativeDecoder
from .data import prompt_ids
from .parallel import batch_slices, check_cpu, check_workers, fork_map

DEFAULT_BUDGET = 0.025  # harmful swaps accepted, per bank problem, up to which the score reads G(h)


@dataclass
class SwapBank:
    """Every mismatch of lossless SD over ``n_problems`` problems, with its single-swap label.

    prompts, responses: per problem, the prompt ids and the lossless response ids.
    seq, positions, draft_tokens, target_tokens, runs: LongTensor[N] per mismatch (its problem,
        its response position, the two candidates, the draft tokens an accept keeps).
    features: FloatTensor[N, F] (spd.FEATURE_NAMES). harmful: BoolTensor[N].
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    seq: torch.Tensor
    positions: torch.Tensor
    draft_tokens: torch.Tensor
    target_tokens: torch.Tensor
    features: torch.Tensor
    runs: torch.Tensor
    harmful: torch.Tensor
    gamma: int

    @property
    def n_problems(self) -> int:
        return len(self.prompts)

    def __len__(self) -> int:
        return int(self.positions.numel())


def build_swap_bank(draft, target, tokenizer, rows: list[dict], gamma: int, max_new_tokens: int,
                    eos_token_id, batch_size: int = 400, workers: int = 1) -> SwapBank:
    """Decode ``rows`` losslessly, then every single swap of their mismatches (see module docstring).
    Mismatches at the last position of the length budget are left out: a swap there has no room for
    an answer. ``workers`` > 1: both decodes in that many forked CPU processes (the same bank; the features'
    last bits follow the batch composition)."""
    if not rows:
        raise ValueError("the swap bank needs at least one problem; got no rows")
    check_workers(workers)
    check_cpu((draft, target), workers)
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=gamma)
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]

    def lossless(inputs: list, limits, decode):
        """``decode`` (lossless SD, or the target alone where only the text counts) of ``inputs``
        (limits: an int or one per input), in batches across the workers."""
        slices = batch_slices(len(inputs), batch_size, workers)
        return fork_map(lambda b: decode(inputs[slices[b]], eos_token_id=eos_token_id,
                                         max_new_tokens=limits if isinstance(limits, int) else limits[slices[b]]),
                        len(slices), workers)

    responses, records = [], []
    for res in lossless(prompts, max_new_tokens, functools.partial(dec.generate, policy=RejectAll())):
        responses += res.responses
        records += res.decisions
    lossless_ok = [is_correct(tokenizer.decode(r, skip_special_tokens=True), row["ground_truth"])
                   for r, row in zip(responses, rows)]
    cols = {k: [] for k in ("seq", "positions", "draft_tokens", "target_tokens", "features", "runs")}
    for i, rec in enumerate(records):
        for j, pos in enumerate(rec.positions):
            if pos + 1 >= max_new_tokens:
                continue
            for k, v in zip(cols, (i, pos, rec.draft_tokens[j], rec.target_tokens[j], rec.features[j], rec.runs[j])):
                cols[k].append(v)
    swaps = [prompts[i] + responses[i][:p] + [d] for i, p, d in zip(cols["seq"], cols["positions"], cols["draft_tokens"])]
    limits = [max_new_tokens - p - 1 for p in cols["positions"]]
    harmful = []
    tails = lossless(swaps, limits, dec.generate_lossless) if swaps else []  # only their text counts
    rest = [tail for res in tails for tail in res.responses]
    for m, tail in enumerate(rest):
        i, p = cols["seq"][m], cols["positions"][m]
        text = tokenizer.decode(responses[i][:p] + [cols["draft_tokens"][m]] + tail, skip_special_tokens=True)
        harmful.append(lossless_ok[i] and not is_correct(text, rows[i]["ground_truth"]))
    long = {k: torch.tensor(cols[k], dtype=torch.long) for k in ("seq", "positions", "draft_tokens", "target_tokens",
                                                                 "runs")}
    features = torch.tensor(cols["features"], dtype=torch.float32).reshape(len(harmful), -1)
    return SwapBank(prompts=prompts, responses=responses, features=features,
                    harmful=torch.tensor(harmful, dtype=torch.bool), gamma=gamma, **long)


@torch.no_grad()
def judge_logits(judge, bank: SwapBank, batch_size: int = 64) -> torch.Tensor:
    """The judge's logit at every bank mismatch ([N]), from one forward per problem (right-padded
    batches: a causal judge's states before the padding do not see it)."""
    device = next(judge.parameters()).device
    out = torch.empty(len(bank))
    order = torch.argsort(bank.seq, stable=True)
    starts = torch.searchsorted(bank.seq[order], torch.arange(bank.n_problems + 1))
    for lo in range(0, bank.n_problems, batch_size):
        problems = range(lo, min(lo + batch_size, bank.n_problems))
        seqs = [bank.prompts[i] + bank.responses[i] for i in problems]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        d, t = torch.zeros_like(ids), torch.zeros_like(ids)
        f = torch.zeros(len(seqs), T, bank.features.shape[1])
        rows, cols, idx = [], [], []
        for b, i in enumerate(problems):
            ids[b, :len(seqs[b])] = torch.tensor(seqs[b])
            mask[b, :len(seqs[b])] = 1
            ks = order[starts[i]:starts[i + 1]]
            q = len(bank.prompts[i]) + bank.positions[ks]
            d[b, q], t[b, q], f[b, q] = bank.draft_tokens[ks], bank.target_tokens[ks], bank.features[ks]
            rows += [b] * len(ks)
            cols += q.tolist()
            idx += ks.tolist()
        logits = judge.decision_logits(ids.to(device), d.to(device), t.to(device), f.to(device),
                                       attention_mask=mask.to(device)).float().cpu()
        out[idx] = logits[rows, cols]
    return out


def swap_score(logits: torch.Tensor, bank: SwapBank, budget: float = DEFAULT_BUDGET) -> float:
    """Mean of G(h) for h = 0 .. ceil(budget · problems) (module docstring); in [0, 1], higher is better.

    logits: [N] one per bank mismatch (:func:`judge_logits`). Ties in the logit are broken towards
    the harmful swap (a judge that cannot tell two swaps apart gets no credit for the harmless one).
    """
    if logits.shape != bank.positions.shape:
        raise ValueError(f"{tuple(logits.shape)} logits for a bank of {len(bank)} mismatches")
    if not budget > 0:
        raise ValueError(f"budget must be > 0 (harmful swaps per bank problem), got {budget!r}")
    if torch.isnan(logits).any():
        raise ValueError("the judge gave NaN logits on the swap bank")
    value = torch.where(bank.harmful, 0, bank.runs).double()
    total = float(value.sum())
    if total == 0:
        raise ValueError("the swap bank has no harmless swap that keeps a draft token: nothing to rank")
    harmful_first = torch.argsort(bank.harmful.long(), descending=True, stable=True)
    order = harmful_first[torch.argsort(logits[harmful_first], descending=True, stable=True)]
    gained = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(value[order], 0)])  # before each
    stops = torch.nonzero(bank.harmful[order]).flatten()  # where the 1st, 2nd, ... harmful swap comes
    g = [float(gained[stops[h]]) if h < len(stops) else total for h in range(math.ceil(budget * bank.n_problems) + 1)]
    return sum(g) / len(g) / total
