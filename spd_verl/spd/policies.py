"""Acceptance policies: what to do at a draft/target mismatch.

Each policy is one small object with one method, ``decide(ctx) -> BoolTensor[N]`` (True = keep the
draft token). The engine calls it once per block with every mismatch of the block over the whole
batch, so a policy never needs to know about caches, blocks or padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Column order of DecisionContext.features (and of the ScoringModel's free features).
FEATURE_NAMES = ("target_logp_draft", "target_logp_target", "target_entropy", "draft_logp_draft")
NUM_FEATURES = len(FEATURE_NAMES)


@dataclass
class DecisionContext:
    """Every mismatch of one block, over the batch (N of them).

    rows:          LongTensor[N]  index of the prompt in the ``generate`` call
    positions:     LongTensor[N]  response position of the draft token
    draft_tokens:  LongTensor[N]
    target_tokens: LongTensor[N]
    logits:        FloatTensor[N] judge logits, or None when the policy needs no judge
    features:      FloatTensor[N, 4] see FEATURE_NAMES (free: computed during verification)
    prefixes:      prompt + response before the draft token, per decision; only filled
                   when the policy sets ``needs_prefix``
    """

    rows: torch.Tensor
    positions: torch.Tensor
    draft_tokens: torch.Tensor
    target_tokens: torch.Tensor
    logits: torch.Tensor | None
    features: torch.Tensor
    prefixes: list[list[int]] | None = None


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
