"""Per-decision credit by branching: which of a rollout's decisions decided its correctness.

GRPO gives every decision of a sequence the same advantage. A rollout that fails after a dozen
accepted mismatches says nothing about which one broke it, and once the judge's accept
probability saturates, the rollouts of a group agree and GRPO's advantage is zero (measured on the
house-styles world: the judge settled on "accept every non-digit", ~3% of answers lost).

Here, for ``branches`` decisions per training rollout, chosen uniformly, the agent loop asks the
server for two lossless continuations of the rollout's own prefix (Monte-Carlo branching, as
VinePPO does for reasoning steps): one with the decision as taken, one with it flipped. Both
continue with the target's greedy decoding, so they differ only by that decision::

    δ_i = correct(prefix, a_i, lossless rest) − correct(prefix, 1 − a_i, lossless rest) ∈ {−1, 0, 1}

δ_i = −1 for an accepted mismatch that broke the answer (or a rejection that did), +1 for one that
saved it, 0 when the decision did not matter. The trainer adds ``coef · δ_i`` to verl's GRPO
advantage at that decision (``add_credit``): the efficiency bonus still comes from the reward
through GRPO, correctness is credited to the decision that decided it. Cost: at most 2 ·
``branches`` lossless continuations per rollout (the "taken" one is the rollout itself when no
mismatch was accepted after the decision), batched by the server with the other requests.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, fields

import torch

from ..reward import is_correct
from .keys import POLICY_PARAM


@dataclass
class CreditConfig:
    """``spd.credit`` section of the training config."""

    branches: int = field(default=0, metadata={"help": "decisions per training rollout given their own credit "
                                                        "(2 lossless continuations each); 0 = plain GRPO"})
    coef: float = field(default=1.0, metadata={"help": "weight of the credit δ ∈ {-1, 0, 1} added to the GRPO "
                                                       "advantage at a branched decision"})

    def __post_init__(self):
        if isinstance(self.branches, bool) or not isinstance(self.branches, int) or self.branches < 0:
            raise ValueError(f"spd.credit.branches must be an integer >= 0, got {self.branches!r}")
        if not isinstance(self.coef, (int, float)) or not self.coef > 0:
            raise ValueError(f"spd.credit.coef must be > 0, got {self.coef!r}")


def credit_config_from(config) -> CreditConfig:
    from omegaconf import OmegaConf

    section = OmegaConf.select(config, "spd.credit", default=None) if config is not None else None
    values = OmegaConf.to_container(section) if section is not None else {}
    unknown = sorted(set(values) - {f.name for f in fields(CreditConfig)})
    if unknown:
        raise ValueError(f"unknown spd.credit keys {unknown}; known: {[f.name for f in fields(CreditConfig)]}")
    return CreditConfig(**values)


def branch_points(num_decisions: int, branches: int, rng: random.Random) -> list[int]:
    """Indices (into a rollout's decision list) to branch at: ``branches`` of them, uniformly."""
    return sorted(rng.sample(range(num_decisions), min(branches, num_decisions)))


async def decision_credit(generate, tokenizer, prompt_ids: list[int], response_ids: list[int], records: dict,
                          ground_truth, max_tokens: int, branches: int, rng: random.Random) -> dict[int, int]:
    """δ for ``branches`` decisions of one rollout: {response position: δ}.

    ``generate(prompt_ids, sampling_params) -> token ids`` is one server request; all requests
    (at most 2·branches) are issued at once so the server batches them.
    """
    positions, actions = records["positions"], records["actions"]
    chosen = branch_points(len(positions), branches, rng)
    if not chosen:
        return {}
    prefixes = []  # per chosen decision: (taken prefix or None when the rollout itself is it, flipped prefix)
    for j in chosen:
        pos, accepted = positions[j], bool(actions[j])
        taken = int(records["draft_tokens"][j] if accepted else records["target_tokens"][j])
        other = int(records["target_tokens"][j] if accepted else records["draft_tokens"][j])
        if response_ids[pos] != taken:
            raise ValueError(f"decision at response position {pos} says token {taken} but the response has "
                             f"{response_ids[pos]}: decision records and tokens are out of step")
        # With no accepted mismatch after it, the rollout continued exactly as lossless decoding
        # would (same tokens, same budget): its own text is the "taken" branch.
        later_accepts = any(actions[k] for k in range(j + 1, len(actions)))
        head = list(response_ids[:pos])
        prefixes.append((head + [taken] if later_accepts else None, head + [other]))
    requests = [prefix for pair in prefixes for prefix in pair if prefix is not None]
    params = {"temperature": 0.0, POLICY_PARAM: "reject_all"}
    continuations = await asyncio.gather(*[
        generate(list(prompt_ids) + prefix, {**params, "max_tokens": max(1, max_tokens - len(prefix))})
        for prefix in requests])
    texts = iter(tokenizer.decode(prefix + list(cont), skip_special_tokens=True)
                 for prefix, cont in zip(requests, continuations))
    rollout_correct = None
    credit = {}
    for j, (taken, _) in zip(chosen, prefixes):
        if taken is None:
            if rollout_correct is None:
                rollout_correct = is_correct(tokenizer.decode(list(response_ids), skip_special_tokens=True),
                                             ground_truth)
            taken_correct = rollout_correct
        else:
            taken_correct = is_correct(next(texts), ground_truth)
        credit[positions[j]] = int(taken_correct) - int(is_correct(next(texts), ground_truth))
    return credit


def add_credit(advantages: torch.Tensor, credit: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """advantages + coef · credit at decision positions, per row.

    advantages, credit, mask: [batch, response_len] (padded, same layout). Rows of ``credit`` are
    zero where no branch was run, so unbranched decisions keep verl's GRPO advantage.
    """
    if not (advantages.shape == credit.shape == mask.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)}, credit {tuple(credit.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    return advantages + coef * credit.to(advantages.dtype) * mask.to(advantages.dtype)
