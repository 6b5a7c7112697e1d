"""Per-decision credit by branching: what each of a rollout's decisions did to its reward.

GRPO gives every decision of a sequence the same advantage. A rollout that fails after a dozen
accepted mismatches says nothing about which one broke it, and once the judge's accept
probability saturates, the rollouts of a group agree and GRPO's advantage is zero (measured on the
house-styles world: the judge settled on "accept every non-digit", ~3% of answers lost).

Here, for ``branches`` decisions per training rollout (chosen uniformly, or with ``pick:
uncertain`` in proportion to p(1-p), where the judge is still undecided), the agent loop asks the
server for lossless continuations of the rollout's own prefix (Monte-Carlo branching, as VinePPO
does for reasoning steps): one with the decision as taken, one with it flipped. Both continue
with the target's greedy decoding, so they differ only by that decision, and each is scored with
the training reward (``spd_verl.reward``, the same RewardConfig) as a whole sequence::

    δ_i = R(prefix, a_i, lossless rest) − R(prefix, 1 − a_i, lossless rest)

With the gated reward: ≈ −1 for an accepted mismatch that broke the answer (+1 for a rejection
that saved it), +α/M for accepting a harmless mismatch (−α/M for rejecting one), 0 when neither
branch is right. The trainer adds ``coef · δ_i`` to verl's GRPO advantage at that decision
(``add_credit``; with ``mode: only`` the advantage is ``coef · δ_i`` alone and only the branched
decisions learn). Cost: at most 2 · ``branches`` lossless continuations per rollout (the "taken"
one is the rollout itself when no mismatch was accepted after the decision), batched by the
server with the other requests. Decisions at the last position of the length budget are not
branched (a flipped token there has no room for an answer).

A lossless rest has no later accepts, so δ is the harm of one accept in the rollout's context,
and harm that only builds up over several accepts (after a run of draft wording the target
itself slips in its sums) never shows in it: δ pays those accepts +α/M while GRPO's sequence
advantage punishes them, and the two pull apart. With ``rest: policy`` the flipped branch
continues with the rollout's own sampled policy (the judge in the loop, its accepts counted), and
the rollout itself is the taken branch, one draw of the same rest:

    δ_i = R(rollout) − R(prefix, 1 − a_i, the policy's rest)

a one-sample estimate of the decision's advantage under the current policy, as GRPO's reward
measures it. It costs one request per branch (SD with the judge, not the target alone).

A harmful accept is rare (~1-2% of accepted wordings on the demo world), so δ is mostly α/M and
says little about *which* wordings are risky. With ``soft_coef`` > 0 each branch also reports its
**soft risk**: the target's summed doubt ``Σ (1 − p_target(token))`` over the number tokens of its
lossless continuation (the arithmetic the answer hangs on), and

    δ_i −= soft_coef · (risk(taken) − risk(flipped))

A wording that makes the target less sure of its own arithmetic is penalised even when the answer
survives this time. Measured on 1,927 accepted wordings of the demo world: risk rises most after
the draft's ":" and "gets", the two wordings whose accepts most often broke answers, and it ranks the
accepts that did break one above the rest with AUC 0.78 (README: Per-decision credit).

Accepting draft wording raises the risk *on average* (by about as much as the acceptance bonus
α/M at soft_coef 1), so the plain soft term also pushes every decision towards reject: runs with it
mostly retreated. With ``soft_center`` the trainer subtracts the batch's mean difference
Δ̄ = mean(risk(accept) − risk(reject)) over the branched decisions before the term joins δ
(``center_soft_terms``): the soft risk then only ranks decisions, riskier than the average
accept or less so, and the trade between accuracy and accepts stays the reward's.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field, fields

import torch

from ..reward import RewardConfig, compute_spd_reward
from .keys import POLICY_PARAM


CREDIT_MODES = ("add", "only")
CREDIT_PICKS = ("uniform", "uncertain")
CREDIT_RESTS = ("lossless", "policy")


@dataclass
class CreditConfig:
    """``spd.credit`` section of the training config."""

    branches: int = field(default=0, metadata={"help": "decisions per training rollout given their own credit "
                                                        "(2 lossless continuations each); 0 = plain GRPO"})
    coef: float = field(default=1.0, metadata={"help": "weight of the credit δ (a reward difference) added to "
                                                       "the GRPO advantage at a branched decision"})
    mode: str = field(default="add", metadata={"help": "'add': GRPO advantage + coef·δ; 'only': coef·δ at branched "
                                                       "decisions, 0 elsewhere (no sequence-level advantage)"})
    pick: str = field(default="uniform", metadata={"help": "which decisions to branch: 'uniform', or 'uncertain' "
                                                           "(drawn in proportion to p(1-p) at rollout time, so the "
                                                           "branches go to decisions the judge has not settled)"})
    rest: str = field(default="lossless", metadata={"help": "how a branch continues after its decision: 'lossless' "
                                                           "(the target's greedy text: no later accepts, two requests "
                                                           "per branch) or 'policy' (the rollout's own sampled policy, "
                                                           "so later accepts and the harm they add up to count; the "
                                                           "rollout itself is the taken branch, one request per branch)"})
    soft_coef: float = field(default=0.0, metadata={"help": "weight of the soft risk: δ −= soft_coef · (risk(taken) "
                                                            "− risk(flipped)), risk = Σ (1 − p_target) over the number "
                                                            "tokens of a branch's lossless continuation; 0 = off"})
    soft_center: bool = field(default=False, metadata={"help": "subtract the batch's mean soft-risk difference "
                                                              "(accept − reject) first, so the soft risk ranks "
                                                              "decisions without pushing all of them towards reject"})

    def __post_init__(self):
        if isinstance(self.branches, bool) or not isinstance(self.branches, int) or self.branches < 0:
            raise ValueError(f"spd.credit.branches must be an integer >= 0, got {self.branches!r}")
        if not isinstance(self.coef, (int, float)) or not self.coef > 0:
            raise ValueError(f"spd.credit.coef must be > 0, got {self.coef!r}")
        if self.mode not in CREDIT_MODES:
            raise ValueError(f"spd.credit.mode must be one of {CREDIT_MODES}, got {self.mode!r}")
        if self.pick not in CREDIT_PICKS:
            raise ValueError(f"spd.credit.pick must be one of {CREDIT_PICKS}, got {self.pick!r}")
        if self.rest not in CREDIT_RESTS:
            raise ValueError(f"spd.credit.rest must be one of {CREDIT_RESTS}, got {self.rest!r}")
        if isinstance(self.soft_coef, bool) or not isinstance(self.soft_coef, (int, float)) or not self.soft_coef >= 0:
            raise ValueError(f"spd.credit.soft_coef must be a number >= 0, got {self.soft_coef!r}")
        if not isinstance(self.soft_center, bool):
            raise ValueError(f"spd.credit.soft_center must be true or false, got {self.soft_center!r}")
        if self.soft_center and not self.soft_coef:
            raise ValueError("spd.credit.soft_center needs spd.credit.soft_coef > 0 (there is no soft risk to centre)")


def credit_config_from(config) -> CreditConfig:
    from omegaconf import OmegaConf

    section = OmegaConf.select(config, "spd.credit", default=None) if config is not None else None
    values = OmegaConf.to_container(section) if section is not None else {}
    unknown = sorted(set(values) - {f.name for f in fields(CreditConfig)})
    if unknown:
        raise ValueError(f"unknown spd.credit keys {unknown}; known: {[f.name for f in fields(CreditConfig)]}")
    return CreditConfig(**values)


def branch_points(candidates: list[int], branches: int, rng: random.Random,
                  weights: list[float] | None = None) -> list[int]:
    """Which decisions (indices into a rollout's decision list) to branch at: ``branches`` of the
    candidates, in order; uniformly, or without replacement in proportion to ``weights`` (one per
    candidate, > 0; Efraimidis-Spirakis keys u^(1/w))."""
    k = min(branches, len(candidates))
    if weights is None:
        return sorted(rng.sample(candidates, k))
    if len(weights) != len(candidates) or not all(w > 0 for w in weights):
        raise ValueError(f"branch weights must be one positive number per candidate, got {weights!r} "
                         f"for {len(candidates)} candidates")
    keys = [math.log(rng.random() or 1e-300) / w for w in weights]
    top = sorted(range(len(candidates)), key=lambda i: keys[i], reverse=True)[:k]
    return sorted(candidates[i] for i in top)


UNCERTAIN_FLOOR = 0.01  # every decision keeps some chance: a settled judge can still be wrong


def uncertainty_weights(logits) -> list[float]:
    """p(1-p) of each decision's rollout-time P(accept), floored at UNCERTAIN_FLOOR."""
    p = torch.sigmoid(torch.as_tensor(logits, dtype=torch.float64))
    return (p * (1.0 - p)).clamp_min(UNCERTAIN_FLOOR).tolist()


def number_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that are numbers ("7", "47", "Ġ12", "▁3"): where the soft risk is read."""
    vocab = tokenizer.get_vocab()
    return frozenset(i for t, i in vocab.items() if t.lstrip("Ġ▁ ").isdigit())


def soft_risk(token_ids, target_logprobs, number_ids) -> float:
    """Σ (1 − p) over the number tokens of ``token_ids``; ``target_logprobs`` aligned with them."""
    if len(target_logprobs) != len(token_ids):
        raise ValueError(f"{len(target_logprobs)} target log-probs for {len(token_ids)} tokens: the soft risk "
                         f"needs one per token (the spd server's spd_target_logprobs)")
    return sum(1.0 - math.exp(lp) for t, lp in zip(token_ids, target_logprobs) if int(t) in number_ids)


@dataclass
class Continuation:
    """A server answer to one branch request."""

    token_ids: list[int]
    mismatches: int   # mismatches decided (all rejected) while decoding it
    truncated: bool   # hit the length budget without finishing
    target_logprobs: list[float] | None = None  # per token; needed by the soft risk only
    accepted: int = 0     # mismatches accepted while decoding it (a policy continuation only)
    run_tokens: int = 0   # draft tokens those accepts kept (reward kind gated_run)


async def decision_credit(generate, tokenizer, prompt_ids: list[int], response_ids: list[int], records: dict,
                          ground_truth, *, rollout_truncated: bool, max_tokens: int, branches: int,
                          rng: random.Random, reward_cfg: RewardConfig, gamma: int | None = None,
                          pick: str = "uniform", soft_coef: float = 0.0, number_ids: frozenset[int] = frozenset(),
                          response_target_logprobs: list[float] | None = None,
                          soft_terms: dict | None = None, soft_in_delta: bool = True,
                          rest: str = "lossless", policy_params: dict | None = None) -> dict[int, float]:
    """δ for ``branches`` decisions of one rollout: {response position: δ}.

    ``generate(prompt_ids, sampling_params) -> Continuation`` is one server request; all requests
    (at most 2·branches) are issued at once so the server batches them. ``rest="policy"``: the
    flipped branch continues with ``policy_params`` (the rollout's own sampling params) instead of
    losslessly, its accepts counted in its reward, and the rollout is the taken branch. With ``soft_coef`` > 0,
    δ includes the soft-risk term (module docstring), which is also written to ``soft_terms``
    {position: term} when given; it needs the continuations' and the rollout's target log-probs.
    ``soft_in_delta=False`` (soft_center) leaves the term out of δ: the trainer adds it, centred.
    """
    if reward_cfg.kind == "tau_bonus":
        raise ValueError("spd.credit needs reward kind 'gated', 'gated_run' or 'correct_only': a branch's target forwards "
                         "over the shared prefix are not recorded, so its tau_bonus cannot be computed")
    positions, actions = records["positions"], [int(a) for a in records["actions"]]
    runs = records.get("runs")
    if reward_cfg.kind == "gated_run" and runs is None:
        raise ValueError("spd.credit with reward kind 'gated_run' needs the decision records' runs "
                         "(the spd rollout's spd_decisions.runs)")
    bought = [int(r) * a for r, a in zip(runs, actions)] if runs is not None else None  # tokens each accept kept
    forced = records.get("forced") or [0] * len(positions)  # a gate's rejects are not the judge's to credit
    candidates = [j for j, p in enumerate(positions) if p + 1 < max_tokens and not forced[j]]
    weights = None
    if pick == "uncertain":
        weights = uncertainty_weights([records["logits"][j] for j in candidates])
    elif pick != "uniform":
        raise ValueError(f"pick must be one of {CREDIT_PICKS}, got {pick!r}")
    chosen = branch_points(candidates, branches, rng, weights)
    if not chosen:
        return {}

    def reward(tokens, mismatches, accepted, truncated, run_tokens=None) -> float:
        text = tokenizer.decode(list(tokens), skip_special_tokens=True)
        return compute_spd_reward(text, ground_truth, mismatches=mismatches, accepted_mismatches=accepted,
                                  target_forwards=0, response_length=len(tokens), hit_length_cap=truncated,
                                  gamma=gamma, cfg=reward_cfg, accepted_run_tokens=run_tokens)["score"]

    if rest == "policy":
        if policy_params is None:
            raise ValueError("spd.credit.rest='policy' needs the rollout's sampling params to continue a branch with")
        params = dict(policy_params)  # each branch sets its own max_tokens below
    elif rest == "lossless":
        params = {"temperature": 0.0, POLICY_PARAM: "reject_all"}
    else:
        raise ValueError(f"rest must be one of {CREDIT_RESTS}, got {rest!r}")
    soft = soft_coef > 0
    if soft and (response_target_logprobs is None or not number_ids):
        raise ValueError("spd.credit.soft_coef > 0 needs the rollout's target log-probs and the number token ids")

    async def branch(prefix, mismatches, accepted, run_tokens) -> tuple[float, float]:
        """Reward of prefix + its continuation (``mismatches``/``accepted``/``run_tokens`` so far; a
        policy continuation adds its own accepts), and the continuation's soft risk (0 when off)."""
        cont = await generate(list(prompt_ids) + prefix, {**params, "max_tokens": max_tokens - len(prefix)})
        risk = soft_risk(cont.token_ids, cont.target_logprobs or [], number_ids) if soft else 0.0
        return reward(prefix + list(cont.token_ids), mismatches + cont.mismatches, accepted + cont.accepted,
                      cont.truncated, None if run_tokens is None else run_tokens + cont.run_tokens), risk

    async def rollout(pos) -> tuple[float, float]:
        risk = soft_risk(response_ids[pos + 1:], response_target_logprobs[pos + 1:], number_ids) if soft else 0.0
        return reward(response_ids, len(positions), sum(actions), rollout_truncated,
                      sum(bought) if bought is not None else None), risk

    jobs = []  # per chosen decision: its taken branch, then its flipped branch
    for j in chosen:
        pos, a = positions[j], actions[j]
        taken = int(records["draft_tokens"][j] if a else records["target_tokens"][j])
        other = int(records["target_tokens"][j] if a else records["draft_tokens"][j])
        if response_ids[pos] != taken:
            raise ValueError(f"decision at response position {pos} says token {taken} but the response has "
                             f"{response_ids[pos]}: decision records and tokens are out of step")
        head, accepted_before = list(response_ids[:pos]), sum(actions[:j])
        # gated_run: an accept in a branch buys its run (the target agrees with those draft tokens,
        # so the rest writes them too); a lossless branch has no later accepts.
        runs_before = sum(bought[:j]) if bought is not None else None
        run_as = (lambda accepts: None if bought is None else runs_before + int(runs[j]) * accepts)
        # With no accepted mismatch after it, the rollout continued exactly as lossless decoding
        # would (same tokens, same budget): the rollout itself is the "taken" branch. Under the
        # policy it always is: the rollout is one draw of the policy's rest after the taken decision.
        jobs.append(branch(head + [taken], j + 1, accepted_before + a, run_as(a))
                    if rest == "lossless" and any(actions[j + 1:]) else rollout(pos))
        jobs.append(branch(head + [other], j + 1, accepted_before + 1 - a, run_as(1 - a)))
    values = await asyncio.gather(*jobs)  # issued together: the server batches them
    out = {}
    for k, j in enumerate(chosen):
        (r_taken, risk_taken), (r_other, risk_other) = values[2 * k], values[2 * k + 1]
        term = -soft_coef * (risk_taken - risk_other)
        out[positions[j]] = r_taken - r_other + (term if soft_in_delta else 0.0)
        if soft_terms is not None and soft:
            soft_terms[positions[j]] = term
    return out


def center_soft_terms(terms: torch.Tensor, actions: torch.Tensor, branched: torch.Tensor,
                      soft_coef: float) -> tuple[torch.Tensor, float]:
    """Soft terms with the batch's mean risk difference taken out (``spd.credit.soft_center``).

    terms, actions, branched: [N] over every decision of a batch (flattened); ``terms`` holds
    ``-soft_coef · s · Δ`` at the branched decisions, with s = +1 for an accept and -1 for a reject
    and Δ = risk(accept branch) − risk(reject branch). Returns (``-soft_coef · s · (Δ − Δ̄)`` at the
    branched decisions and 0 elsewhere, Δ̄); Δ̄ is 0 when nothing was branched.
    """
    if not (terms.shape == actions.shape == branched.shape) or terms.dim() != 1:
        raise ValueError(f"terms {tuple(terms.shape)}, actions {tuple(actions.shape)} and branched "
                         f"{tuple(branched.shape)} must be one flat shape")
    if not soft_coef > 0:
        raise ValueError(f"soft_coef must be > 0 to centre soft terms, got {soft_coef!r}")
    b = branched.bool()
    sign = 2.0 * actions.to(terms.dtype) - 1.0
    if not b.any():
        return torch.zeros_like(terms), 0.0
    delta = -terms * sign / soft_coef
    mean = float(delta[b].mean())
    return torch.where(b, terms + soft_coef * sign * mean, torch.zeros_like(terms)), mean


def add_credit(advantages: torch.Tensor, credit: torch.Tensor, mask: torch.Tensor, coef: float,
               only: bool = False) -> torch.Tensor:
    """advantages + coef · credit at decision positions (``only``: coef · credit alone).

    advantages, credit, mask: one shape ([response_len] for a row, or a padded batch). ``credit``
    is zero where no branch was run, so unbranched decisions keep verl's GRPO advantage.
    """
    if not (advantages.shape == credit.shape == mask.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)}, credit {tuple(credit.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    added = coef * credit.to(advantages.dtype) * mask.to(advantages.dtype)
    return added if only else advantages + added
