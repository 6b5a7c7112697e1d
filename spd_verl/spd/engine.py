"""Batched judge-in-the-loop speculative decoding (DESIGN.md §3). No verl imports.

Per block and per active row: the draft proposes γ tokens (γ draft forwards on its cache), the
target verifies them in one forward, the judge (if the policy needs it) scores the block in one
forward on its own cache, and a walk keeps draft tokens up to the first rejected mismatch, then
emits the target's token there (or the bonus token when the whole block is kept). Caches are
rolled back by invalidating slots (see cache.py), so rows may diverge freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .cache import SlotCache, left_pad
from .lossless import LosslessResult, replay_lossless, target_greedy
from .policies import NUM_FEATURES, DecisionContext, Policy, RejectAll


@dataclass
class DecisionRecord:
    """Every decision (mismatch reached by the walk) of one sequence, in response order."""

    positions: list[int] = field(default_factory=list)
    draft_tokens: list[int] = field(default_factory=list)
    target_tokens: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)  # 1 accept / 0 reject
    logits: list[float] = field(default_factory=list)  # judge logits (NaN when no judge ran)
    features: list[list[float]] = field(default_factory=list)  # [n, F], see FEATURE_NAMES
    # 1 where a gate rejected whatever the policy chose (DecisionContext.forced): a mismatch, not a
    # decision of the policy, so it gets no log-prob or gradient in training.
    forced: list[int] = field(default_factory=list)
    # Draft tokens an accept here keeps (kept, for a reject) before the block's next mismatch, the
    # block's end, the token budget or an EOS: what accepting buys in this block (the ``gated_run``
    # reward pays these; the credit's flipped branches read them for the rejects).
    runs: list[int] = field(default_factory=list)
    target_forwards: int = 0

    @property
    def mismatches(self) -> int:
        return len(self.actions)

    @property
    def accepted_mismatches(self) -> int:
        return sum(self.actions)

    @property
    def forced_rejects(self) -> int:
        return sum(self.forced)

    @property
    def accepted_run_tokens(self) -> int:
        return sum(r for r, a in zip(self.runs, self.actions) if a)


@dataclass
class SDResult:
    responses: list[list[int]]
    decisions: list[DecisionRecord]
    stats: dict
    # Target log-prob of every emitted token, aligned with ``responses`` (the verification pass
    # computes it anyway). Lossless decoding emits the target's argmax, so there it is the target's
    # confidence in its own text: what the credit's soft risk reads (verl_ext/credit.py).
    target_logprobs: list[list[float]] = field(default_factory=list)


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def _vocab_size(model) -> int:
    return int(model.config.vocab_size)


class SpeculativeDecoder:
    """Speculative decoding with a judge at every draft/target mismatch.

    Args:
        draft_model, target_model: causal LMs (Hugging Face interface, ``.config.vocab_size``)
            sharing one vocabulary. Used frozen, in eval mode.
        judge: optional ScoringModel (possibly PEFT-wrapped); needed by judge policies.
        num_speculative_tokens: γ, draft tokens proposed per block.
        draft_temperature: 0 = greedy draft; > 0 samples (seeded by ``seed``).
        preallocate_cache: KV caches append in place into preallocated buffers (cache.py); False
            uses Hugging Face's plain DynamicCache. Same outputs either way; True is faster.
    """

    def __init__(self, draft_model, target_model, judge=None, num_speculative_tokens: int = 4,
                 draft_temperature: float = 0.0, seed: int | None = None, preallocate_cache: bool = True):
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens (γ) must be an integer >= 1, got {num_speculative_tokens!r}")
        vd, vt = _vocab_size(draft_model), _vocab_size(target_model)
        if vd != vt:
            raise ValueError(f"draft and target vocabularies differ: draft vocab_size={vd}, target vocab_size={vt}")
        if judge is not None and _vocab_size(judge) != vt:
            raise ValueError(f"judge and target vocabularies differ: judge vocab_size={_vocab_size(judge)}, "
                             f"target vocab_size={vt}")
        if draft_temperature < 0:
            raise ValueError(f"draft_temperature must be >= 0, got {draft_temperature}")
        self.draft, self.target, self.judge = draft_model, target_model, judge
        self.gamma = num_speculative_tokens
        self.draft_temperature = float(draft_temperature)
        self.preallocate_cache = bool(preallocate_cache)
        self.generator = torch.Generator(device="cpu")
        if seed is not None:
            self.generator.manual_seed(seed)
        self.device = next(target_model.parameters()).device

    # ------------------------------------------------------------------ helpers
    def _draft_pick(self, logits: torch.Tensor):
        """logits [B, V] -> (tokens [B], draft log-prob of those tokens [B])."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.draft_temperature > 0:
            probs = torch.softmax(logits.float().cpu() / self.draft_temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(logits.device)
        else:
            tok = logp.argmax(dim=-1)
        return tok, logp.gather(1, tok[:, None]).squeeze(1)

    def _validate(self, prompts, policy, max_new_tokens) -> list[int]:
        """Checks the inputs; returns the per-prompt token limits."""
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a spd_verl.spd.Policy, got {type(policy).__name__}")
        if policy.needs_judge and self.judge is None:
            raise ValueError(f"policy {policy.name!r} needs a judge but SpeculativeDecoder has judge=None")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: nothing to generate")
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} limits for {len(prompts)} prompts")
        bad = [m for m in limits if isinstance(m, bool) or not isinstance(m, int) or m < 1]
        if bad:
            raise ValueError(f"max_new_tokens must be an integer >= 1 (or one per prompt), got {bad[0]!r}")
        vocab = _vocab_size(self.target)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return limits

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], policy: Policy | None = None,
                 max_new_tokens: int | Sequence[int] = 64, eos_token_id=None) -> SDResult:
        """max_new_tokens: one limit for all prompts, or one per prompt."""
        policy = RejectAll() if policy is None else policy
        limits = self._validate(prompts, policy, max_new_tokens)
        dev, gamma, eos = self.device, self.gamma, _eos_set(eos_token_id)
        use_judge = policy.needs_judge
        B = len(prompts)
        responses: list[list[int]] = [[] for _ in range(B)]
        target_lps: list[list[float]] = [[] for _ in range(B)]
        records = [DecisionRecord() for _ in range(B)]
        counters = dict(draft_forwards=0, judge_forwards=0, blocks=0, draft_proposed=0, draft_kept=0, nan_logits=0)

        # Prefill everything but the last prompt token (left-padded); that token is "pending":
        # the first input of the next forward of every model.
        ids, valid = left_pad(prompts, dev)
        pre = self.preallocate_cache
        caches = {"draft": SlotCache(self.draft, B, dev, pre), "target": SlotCache(self.target, B, dev, pre)}
        if use_judge:
            caches["judge"] = SlotCache(self.judge, B, dev, pre)
        if ids.shape[1] > 1:
            for c in caches.values():
                c.forward(ids[:, :-1], valid[:, :-1])
        pending_target = ids[:, -1].clone()  # [B]
        draft_pending = ids[:, -1:].clone()  # [B, W] right-padded, W ∈ {1, 2}
        draft_pending_valid = torch.ones(B, 1, dtype=torch.bool, device=dev)
        active = list(range(B))  # batch row -> prompt index

        while active:
            nb = len(active)
            counters["blocks"] += 1
            # 1. Draft γ tokens.
            out = caches["draft"].forward(draft_pending, draft_pending_valid)
            last = draft_pending_valid.long().sum(dim=1) - 1
            logits = out.logits[torch.arange(nb, device=dev), last]
            drafts, draft_lp = [], []
            for k in range(gamma):
                tok, lp = self._draft_pick(logits)
                drafts.append(tok)
                draft_lp.append(lp)
                if k < gamma - 1:
                    out = caches["draft"].forward(tok[:, None], torch.ones(nb, 1, dtype=torch.bool, device=dev))
                    logits = out.logits[:, -1]
            counters["draft_forwards"] += gamma
            d = torch.stack(drafts, dim=1)  # [nb, γ]
            d_lp = torch.stack(draft_lp, dim=1)

            # 2. Verify: one target forward over [pending, d_1..d_γ].
            block = torch.cat([pending_target[:, None], d], dim=1)  # [nb, γ+1]
            block_valid = torch.ones_like(block, dtype=torch.bool)
            t_start = caches["target"].length
            t_logp = torch.log_softmax(caches["target"].forward(block, block_valid).logits.float(), dim=-1)
            t = t_logp.argmax(dim=-1)  # [nb, γ+1]; t[:, j] = target's choice for draft position j
            mismatch = d != t[:, :gamma]
            nxt = next_mismatch(mismatch)
            t_lp_draft = t_logp[:, :gamma].gather(2, d[..., None]).squeeze(-1)
            features = torch.cat([torch.stack([
                t_lp_draft,
                t_logp[:, :gamma].gather(2, t[:, :gamma, None]).squeeze(-1),
                -(t_logp[:, :gamma].exp() * t_logp[:, :gamma]).sum(-1),
                d_lp,
            ], dim=-1), run_features(nxt, t_lp_draft)], dim=-1)  # [nb, γ, F]

            # 3. Judge: one forward over the same block (its cache must follow the target's).
            judge_logits = None
            if use_judge:
                cand_d = torch.cat([torch.zeros_like(d[:, :1]), d], dim=1)
                cand_t = torch.cat([torch.zeros_like(d[:, :1]), t[:, :gamma]], dim=1)
                cand_f = torch.cat([torch.zeros_like(features[:, :1]), features], dim=1)
                jo = caches["judge"].forward(block, block_valid, draft_tokens=cand_d, target_tokens=cand_t,
                                             features=cand_f)
                judge_logits = jo.logits[:, 1:].float()  # [nb, γ]
                counters["judge_forwards"] += 1

            # 4. Decide every mismatch of the block at once, then walk.
            accept = torch.zeros_like(mismatch)
            forced = torch.zeros_like(mismatch)
            mm_rows, mm_cols = mismatch.nonzero(as_tuple=True)
            if mm_rows.numel():
                lg = judge_logits[mm_rows, mm_cols] if use_judge else None
                prefixes = None
                if policy.needs_prefix:
                    prefixes = [prompts[active[r]] + responses[active[r]] + d[r, :c].tolist()
                                for r, c in zip(mm_rows.tolist(), mm_cols.tolist())]
                ctx = DecisionContext(
                    rows=torch.tensor([active[r] for r in mm_rows.tolist()], dtype=torch.long),
                    positions=torch.tensor([len(responses[active[r]]) + c
                                            for r, c in zip(mm_rows.tolist(), mm_cols.tolist())], dtype=torch.long),
                    draft_tokens=d[mm_rows, mm_cols], target_tokens=t[mm_rows, mm_cols],
                    logits=lg, features=features[mm_rows, mm_cols], prefixes=prefixes)
                acc = policy.decide(ctx).to(dev).bool()
                if acc.shape != mm_rows.shape:
                    raise ValueError(f"policy {policy.name!r} returned {tuple(acc.shape)} decisions for "
                                     f"{mm_rows.numel()} mismatches")
                if ctx.forced is not None:
                    if ctx.forced.shape != mm_rows.shape:
                        raise ValueError(f"policy {policy.name!r} set {tuple(ctx.forced.shape)} forced flags for "
                                         f"{mm_rows.numel()} mismatches")
                    forced[mm_rows, mm_cols] = ctx.forced.to(dev).bool()
                if lg is not None:
                    nan = torch.isnan(lg)
                    counters["nan_logits"] += int(nan.sum())
                    acc = acc & ~nan  # a NaN logit is never an accept
                accept[mm_rows, mm_cols] = acc
            reject = mismatch & ~accept
            r = torch.where(reject.any(dim=1), reject.float().argmax(dim=1), torch.full_like(reject[:, 0], gamma,
                                                                                            dtype=torch.long))

            # 5. Emit per row; record the decisions the walk reached.
            # What each block position would emit: d_j before the first reject, t_j from it on (the
            # bonus t_γ+1 when all is kept); emitted[:cut] below is a prefix of it.
            cols = torch.arange(gamma + 1, device=dev)
            emit_tok = torch.where(cols[None] < r[:, None], torch.cat([d, t[:, gamma:]], dim=1), t)
            emit_lp = t_logp.gather(2, emit_tok[..., None]).squeeze(-1).tolist()
            r_list, d_list, t_list = r.tolist(), d.tolist(), t.tolist()
            mm_list, acc_list, forced_list, nxt_list = mismatch.tolist(), accept.tolist(), forced.tolist(), nxt.tolist()
            lg_list = judge_logits.tolist() if use_judge else None
            f_list = features.tolist()
            done = []
            for i, b in enumerate(active):
                ri = r_list[i]
                emitted = d_list[i][:ri] + [t_list[i][ri]]
                room = limits[b] - len(responses[b])
                cut = min(len(emitted), room)
                for j, tok in enumerate(emitted[:cut]):
                    if tok in eos:
                        cut = j + 1
                        break
                rec = records[b]
                rec.target_forwards += 1
                base = len(responses[b])
                for j in range(min(ri + 1, gamma, cut)):
                    if mm_list[i][j]:
                        rec.positions.append(base + j)
                        rec.draft_tokens.append(d_list[i][j])
                        rec.target_tokens.append(t_list[i][j])
                        rec.actions.append(int(acc_list[i][j]))
                        rec.logits.append(lg_list[i][j] if use_judge else float("nan"))
                        rec.features.append(f_list[i][j])
                        rec.forced.append(int(forced_list[i][j]))
                        rec.runs.append(_run_length(d_list[i], j, min(nxt_list[i][j], room), eos))
                responses[b].extend(emitted[:cut])
                target_lps[b].extend(emit_lp[i][:cut])
                counters["draft_proposed"] += gamma
                counters["draft_kept"] += min(ri, cut)
                if cut < len(emitted) or len(responses[b]) >= limits[b] or (cut and emitted[cut - 1] in eos):
                    done.append(i)

            # 6. Roll back caches to the kept prefix, set the next pending tokens, drop finished rows.
            caches["target"].invalidate(t_start, r + 1)
            if use_judge:
                caches["judge"].invalidate(t_start, r + 1)
            # The draft fed its W pending columns (right-padded) plus d_1..d_{γ-1}; it keeps the
            # pending ones and the kept drafts (d_γ was never fed: it becomes pending if kept).
            width = draft_pending.shape[1]
            d_start = caches["draft"].length - (width + gamma - 1)
            caches["draft"].invalidate(d_start, width + torch.clamp(r, max=gamma - 1))
            t_next = t.gather(1, r[:, None]).squeeze(1)
            full = r >= gamma
            if bool(full.any()):
                draft_pending = torch.stack([torch.where(full, d[:, -1], t_next), t_next], dim=1)
                draft_pending_valid = torch.stack([torch.ones_like(full), full], dim=1)
            else:
                draft_pending = t_next[:, None]
                draft_pending_valid = torch.ones(nb, 1, dtype=torch.bool, device=dev)
            pending_target = t_next

            if done:
                keep = torch.tensor([i for i in range(nb) if i not in set(done)], dtype=torch.long, device=dev)
                active = [active[i] for i in keep.tolist()]
                if not active:
                    break
                for c in caches.values():
                    c.select_rows(keep)
                pending_target = pending_target[keep]
                draft_pending, draft_pending_valid = draft_pending[keep], draft_pending_valid[keep]
                if not bool(draft_pending_valid[:, 1:].any()):
                    draft_pending, draft_pending_valid = draft_pending[:, :1], draft_pending_valid[:, :1]
            for c in caches.values():
                c.maybe_compact()

        return SDResult(responses, records, self._stats(responses, records, counters), target_lps)

    @torch.no_grad()
    def generate_lossless(self, prompts: list[list[int]], max_new_tokens: int | Sequence[int] = 64,
                          eos_token_id=None) -> LosslessResult:
        """What ``generate(prompts, RejectAll())`` emits, and its mismatch and target-forward counts,
        decoded by the target alone (``lossless.py``: faster when the draft is not much cheaper than
        the target). A sampled draft's proposals cannot be replayed: then this runs lossless SD."""
        limits = self._validate(prompts, RejectAll(), max_new_tokens)
        if self.draft_temperature > 0:
            res = self.generate(prompts, RejectAll(), limits, eos_token_id)
            return LosslessResult(res.responses, res.target_logprobs, [r.mismatches for r in res.decisions],
                                  [r.target_forwards for r in res.decisions])
        responses, logprobs = target_greedy(self.target, prompts, limits, _eos_set(eos_token_id),
                                            self.preallocate_cache)
        mismatches, forwards = replay_lossless(self.draft, prompts, responses, self.gamma)
        return LosslessResult(responses, logprobs, mismatches, forwards)

    @staticmethod
    def _stats(responses, records, counters) -> dict:
        emitted = sum(len(r) for r in responses)
        forwards = sum(rec.target_forwards for rec in records)
        mism = sum(rec.mismatches for rec in records)
        acc = sum(rec.accepted_mismatches for rec in records)
        forced = sum(rec.forced_rejects for rec in records)
        runs = sum(rec.accepted_run_tokens for rec in records)
        return dict(
            sequences=len(responses), emitted_tokens=emitted, target_forwards=forwards,
            tau=emitted / max(1, forwards), mismatches=mism, accepted_mismatches=acc,
            accepted_mismatch_rate=acc / mism if mism else 0.0, forced_rejects=forced,
            accepted_run_tokens=runs,
            draft_acceptance_rate=counters["draft_kept"] / max(1, counters["draft_proposed"]),
            mean_response_length=emitted / max(1, len(responses)),
            target_forwards_per_sequence=forwards / max(1, len(responses)),
            **counters,
        )


def next_mismatch(mismatch: torch.Tensor) -> torch.Tensor:
    """mismatch: BoolTensor[B, γ] -> LongTensor[B, γ]: per column, the column of the row's next
    mismatch after it, or γ when there is none."""
    gamma = mismatch.shape[1]
    cols = torch.where(mismatch, torch.arange(gamma, device=mismatch.device), gamma)
    # Reverse cumulative min gives the first mismatch at or after each column; shift by one.
    at_or_after = cols.flip(1).cummin(dim=1).values.flip(1)
    return torch.cat([at_or_after[:, 1:], torch.full_like(cols[:, :1], gamma)], dim=1)


def _run_length(draft: list[int], j: int, end: int, eos: set[int]) -> int:
    """Draft tokens kept by an accept at block column ``j`` when the block stops at column ``end``:
    up to and including the first EOS among them."""
    for k in range(j, end):
        if draft[k] in eos:
            return k + 1 - j
    return end - j


def run_features(nxt: torch.Tensor, target_logp_draft: torch.Tensor) -> torch.Tensor:
    """The look-ahead columns of FEATURE_NAMES for every draft column of a block.

    nxt: LongTensor[B, γ] (``next_mismatch``); target_logp_draft: [B, γ] the target's log-prob of
    each draft token. -> [B, γ, 3]: run_tokens = nxt - j, run_reaches_block_end = (nxt == γ),
    run_min_target_logp = min of target_logp_draft over the columns j < k < nxt (0 when empty).
    """
    gamma = nxt.shape[1]
    cols = torch.arange(gamma, device=nxt.device)
    inside = (cols[None, None, :] > cols[None, :, None]) & (cols[None, None, :] < nxt[:, :, None])  # [B, j, k]
    low = torch.where(inside, target_logp_draft[:, None, :], torch.inf).amin(dim=-1)
    return torch.stack([(nxt - cols).float(), (nxt == gamma).float(),
                        torch.where(inside.any(dim=-1), low, 0.0)], dim=-1)


def decision_tensors(records: list[DecisionRecord], length: int, num_features: int = NUM_FEATURES) -> dict:
    """Decision records -> tensors [B, length] aligned with right-padded responses.

    Keys: decision_mask (float 1 at decisions, not at a gate's forced rejects), draft_tokens,
    target_tokens (long, 0 elsewhere), actions (float), old_logits (float), features [B, length, F].
    """
    B = len(records)
    out = dict(
        decision_mask=torch.zeros(B, length), draft_tokens=torch.zeros(B, length, dtype=torch.long),
        target_tokens=torch.zeros(B, length, dtype=torch.long), actions=torch.zeros(B, length),
        old_logits=torch.zeros(B, length), features=torch.zeros(B, length, num_features),
    )
    for b, rec in enumerate(records):
        if not rec.positions:
            continue
        if max(rec.positions) >= length:
            raise ValueError(f"sequence {b} has a decision at response position {max(rec.positions)} "
                             f"but the response tensor is only {length} long")
        pos = torch.tensor(rec.positions, dtype=torch.long)
        out["decision_mask"][b, pos] = 1.0 - torch.tensor(rec.forced or [0] * len(pos), dtype=torch.float)
        out["draft_tokens"][b, pos] = torch.tensor(rec.draft_tokens, dtype=torch.long)
        out["target_tokens"][b, pos] = torch.tensor(rec.target_tokens, dtype=torch.long)
        out["actions"][b, pos] = torch.tensor(rec.actions, dtype=torch.float)
        out["old_logits"][b, pos] = torch.tensor(rec.logits, dtype=torch.float)
        out["features"][b, pos] = torch.tensor(rec.features, dtype=torch.float)
    return out
