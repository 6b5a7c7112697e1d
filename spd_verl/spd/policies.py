"""Acceptance policies: what to do at a draft/target mismatch.

Each policy is one small object with one method, ``decide(ctx) -> BoolTensor[N]`` (True = keep the
draft token). The engine calls it once per block with every mismatch of the block over the whole
batch, so a policy never needs to know about caches, blocks or padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Column order of DecisionContext.features (and of the ScoringModel's free features). All come from
# the verification pass. The last three look down the block from the draft token (the run gate's
# information, for the judge to weigh): how many draft tokens an accept keeps before the next
# mismatch (in tokens, the unit of the gate's min_run), whether that run reaches the block's end, and the target's lowest
# log-prob on the draft tokens of that run (0 when it has none): how sure the target is of the
# continuation the draft's token leads into. A judge reads the first ``num_features`` columns,
# so judges built with the first four still load and score as before.
FEATURE_NAMES = ("target_logp_draft", "target_logp_target", "target_entropy", "draft_logp_draft",
                 "run_tokens", "run_reaches_block_end", "run_min_target_logp")
NUM_FEATURES = len(FEATURE_NAMES)
RUN_TOKENS = FEATURE_NAMES.index("run_tokens")  # the column RunGated reads


@dataclass
class DecisionContext:
    """Every mismatch of one block, over the batch (N of them).

    rows:          LongTensor[N]  index of the prompt in the ``generate`` call
    positions:     LongTensor[N]  response position of the draft token
    draft_tokens:  LongTensor[N]
    target_tokens: LongTensor[N]
    logits:        FloatTensor[N] judge logits, or None when the policy needs no judge
    features:      FloatTensor[N, F] see FEATURE_NAMES (free: computed during verification)
    prefixes:      prompt + response before the draft token, per decision; only filled
                   when the policy sets ``needs_prefix``
    forced:        BoolTensor[N] written by a gate (RunGated) in ``decide``: True where the gate
                   rejects whatever the wrapped policy chose. Those mismatches are not the
                   policy's decisions, so training gives them no log-prob and no gradient.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    draft_tokens: torch.Tensor
    target_tokens: torch.Tensor
    logits: torch.Tensor | None
    features: torch.Tensor
    prefixes: list[list[int]] | None = None
    forced: torch.Tensor | None = None


class Policy:
    needs_judge: bool = False
    needs_prefix: bool = False
    name: str = "policy"

    def decide(self, ctx: DecisionContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _check_probability(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return float(value)


class RejectAll(Policy):
    """Standard lossless SD: output equals the target's own greedy decoding."""

    name = "reject_all"

    def decide(self, ctx):
        return torch.zeros_like(ctx.draft_tokens, dtype=torch.bool)


class AcceptAll(Policy):
    """Keep every draft token: each block is γ draft tokens then the target's bonus token."""

    name = "accept_all"

    def decide(self, ctx):
        return torch.ones_like(ctx.draft_tokens, dtype=torch.bool)


class ThresholdPolicy(Policy):
    """Evaluation/deployment rule: accept iff sigmoid(judge logit) > threshold."""

    needs_judge = True

    def __init__(self, threshold: float = 0.5):
        self.threshold = _check_probability("threshold", threshold)
        self._logit = math.log(self.threshold / (1.0 - self.threshold))
        self.name = f"judge@{self.threshold:g}"

    def decide(self, ctx):
        # Compared in logit space: sigmoid saturates to exactly 1.0 in float32 for logits > ~17.
        return ctx.logits > self._logit


class BernoulliPolicy(Policy):
    """Training rule: accept ~ Bernoulli(sigmoid(logit)) — the exploration GRPO needs."""

    needs_judge = True
    name = "judge_sample"

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()

    def decide(self, ctx):
        p = torch.sigmoid(ctx.logits.detach().float().cpu())
        u = torch.rand(p.shape, generator=self.generator)
        return (u < p).to(ctx.logits.device)


class TargetProbPolicy(Policy):
    """Training-free baseline: accept iff the target's probability of the draft token ≥ eps."""

    def __init__(self, eps: float):
        self.eps = _check_probability("eps", eps)
        self._log_eps = math.log(self.eps)
        self.name = f"target_prob@{self.eps:g}"

    def decide(self, ctx):
        return ctx.features[:, 0] >= self._log_eps


class TypicalPolicy(Policy):
    """Typical acceptance (Medusa; cf. Fuzzy SD's divergence rules): accept iff
    p_target(draft) > min(epsilon, delta * exp(-H(target))). A flat (high-entropy) target
    distribution lowers the bar; a confident target keeps it near ``epsilon``."""

    def __init__(self, epsilon: float = 0.3, delta: float | None = None):
        self.epsilon = _check_probability("epsilon", epsilon)
        self.delta = math.sqrt(self.epsilon) if delta is None else _check_probability("delta", delta)
        self.name = f"typical@{self.epsilon:g}"

    def decide(self, ctx):
        p_draft = ctx.features[:, 0].exp()
        bar = torch.clamp(self.delta * torch.exp(-ctx.features[:, 2]), max=self.epsilon)
        return p_draft > bar


class RunGated(Policy):
    """``policy``'s accepts, kept only where the accept keeps a run of at least ``min_run`` draft
    tokens (itself included) in its block: up to the block's next *rejected* mismatch, or to the
    block's end (where the bonus token comes on top). Later mismatches are decided first, so the
    run counts the later accepts the gate lets through.

    Free: verification has already compared every later draft token of the block with the target's
    choice. A long run means the target goes on agreeing with where the draft's token leads (on the
    demo world at γ = 8 it halves the answers accepting loses; README: Results, session 13).

    A mismatch whose accept could not keep ``min_run`` tokens is rejected whatever ``policy`` says:
    ``decide`` marks it in ``ctx.forced``, so a judge trained behind the gate (sampled decisions)
    learns only from the mismatches where its choice is carried out.

    The run to the block's next mismatch is the ``run_tokens`` feature column."""

    def __init__(self, policy: Policy, min_run: int):
        if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 1:
            raise ValueError(f"min_run must be an integer >= 1, got {min_run!r}")
        self.policy, self.min_run = policy, min_run
        self.needs_judge, self.needs_prefix = policy.needs_judge, policy.needs_prefix
        self.name = f"{policy.name} run>={min_run}"

    def decide(self, ctx):
        if ctx.features.shape[-1] <= RUN_TOKENS:
            raise ValueError(f"{self.name} reads the run_tokens feature (column {RUN_TOKENS} of FEATURE_NAMES); "
                             f"DecisionContext.features has only {ctx.features.shape[-1]} columns")
        ok = self.policy.decide(ctx).cpu().bool()
        out, forced = torch.zeros_like(ok), torch.zeros_like(ok)
        rows, pos = ctx.rows.tolist(), ctx.positions.tolist()
        gaps = ctx.features[:, RUN_TOKENS].long().tolist()
        stop = {}  # row -> where the run of an accept at the current mismatch ends
        for k in sorted(range(len(rows)), key=lambda k: (rows[k], -pos[k])):  # each row last-first
            end = stop.setdefault(rows[k], pos[k] + gaps[k])  # the row's last mismatch: the block's end
            forced[k] = end - pos[k] < self.min_run
            if ok[k] and not forced[k]:
                out[k] = True
            else:
                stop[rows[k]] = pos[k]
        ctx.forced = forced
        return out.to(ctx.draft_tokens.device)


def run_gated(policy: Policy, min_run: int) -> Policy:
    """``policy`` behind ``RunGated(policy, min_run)``, or ``policy`` itself when ``min_run`` is 1."""
    return policy if min_run == 1 else RunGated(policy, min_run)
