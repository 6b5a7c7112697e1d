"""Agent loop ``spd_agent``: verl's single-turn loop, with the judge's decisions put into the batch.

The policy being trained makes one Bernoulli decision per draft/target mismatch, not one token per
position, so the output carries (DESIGN.md §4, aligned with ``responses``):

- ``response_mask`` = decision mask (1 only where a mismatch was decided) — verl uses it as the
  loss mask for old/ref log-probs, entropy, KL and the PPO loss;
- ``response_logprobs`` = the rollout's decision log-probs (→ ``rollout_log_probs``);
- ``spd_draft_tokens``, ``spd_target_tokens``, ``spd_actions``, ``spd_old_logits``,
  ``spd_features`` tensors that reach the actor engine (``engine.SPDScoringEngine``);
- per-sequence SPD statistics in ``extra_fields`` (reward manager and metrics);
- with ``spd.credit.branches`` > 0, on training rollouts, ``spd_credit``: the per-decision credit δ
  of ``credit.py`` at the branched decisions (0 elsewhere), which the trainer adds to the advantage;
  with ``spd.credit.soft_center`` also ``spd_credit_soft`` (the soft terms, left out of δ) and
  ``spd_credit_branched`` (1 at the branched decisions), which the trainer centres over the batch.

Works with the V1 trainer (TransferQueue path), whose agent-loop worker stores ``as_dict()``.
"""

from __future__ import annotations

import logging
import random
import zlib
from typing import Any, Optional
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from ..spd.policies import NUM_FEATURES
from .credit import Continuation, credit_config_from, decision_credit, number_token_ids
from .keys import (CREDIT_BRANCHED_KEY, CREDIT_KEY, CREDIT_SOFT_KEY, DECISIONS_KEY, SIDE_FIELDS,
                   TARGET_LOGPROBS_KEY)
from .reward_manager import reward_config_from

AGENT_NAME = "spd_agent"

# verl builds a Continuous Token builder per agent-loop instance, i.e. per sample, and for a
# config.json model_type it has no entry for (our Llama checkpoints) warns each time that it falls
# back to the default text builder, which is the right one here: ~2,400 identical lines in a
# 60-step demo run. Say it once per process instead of dropping it.
CONTINUOUS_TOKEN_LOGGER = "verl.utils.tokenizer.continuous_token_wiring"
CONTINUOUS_TOKEN_FALLBACK = "No model-specific Continuous Token builder"


class OnceFilter(logging.Filter):
    """Lets the first record of each message that starts with ``prefix`` through, then drops repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_fallback_logger = logging.getLogger(CONTINUOUS_TOKEN_LOGGER)
if not any(isinstance(f, OnceFilter) for f in _fallback_logger.filters):
    _fallback_logger.addFilter(OnceFilter(CONTINUOUS_TOKEN_FALLBACK))


class SPDAgentLoopOutput(AgentLoopOutput):
    """AgentLoopOutput plus the decision tensors (verl's class ignores unknown fields)."""

    spd_draft_tokens: Optional[list[int]] = None
    spd_target_tokens: Optional[list[int]] = None
    spd_actions: Optional[list[float]] = None
    spd_old_logits: Optional[list[float]] = None
    spd_features: Optional[list[list[float]]] = None
    spd_credit: Optional[list[float]] = None
    spd_credit_soft: Optional[list[float]] = None
    spd_credit_branched: Optional[list[float]] = None

    def as_dict(self) -> dict[str, Any]:
        output = super().as_dict()
        dtypes = dict(spd_draft_tokens=torch.int64, spd_target_tokens=torch.int64)
        for key in (*SIDE_FIELDS, CREDIT_KEY, CREDIT_SOFT_KEY, CREDIT_BRANCHED_KEY):
            value = output.pop(key, None)
            if value is not None:
                output[key] = torch.tensor(value, dtype=dtypes.get(key, torch.float32))
        if "spd_features" in output:
            output["spd_features"] = output["spd_features"].reshape(-1, NUM_FEATURES)
        return output


def decision_fields(records: dict, length: int) -> dict:
    """Server decision records of one sequence -> per-position lists of ``length`` entries."""
    positions = records["positions"]
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise ValueError(f"decision positions {bad[:3]} outside the response (length {length}): the response was "
                         f"cut or re-tokenised after generation, so decisions no longer align with tokens")
    mask, draft, target = [0] * length, [0] * length, [0] * length
    actions, logits = [0.0] * length, [0.0] * length
    features = [[0.0] * NUM_FEATURES for _ in range(length)]
    forced = records.get("forced") or [0] * len(positions)  # a gate's rejects: no decision to learn from
    for i, p in enumerate(positions):
        mask[p] = 0 if forced[i] else 1
        draft[p] = int(records["draft_tokens"][i])
        target[p] = int(records["target_tokens"][i])
        actions[p] = float(records["actions"][i])
        logits[p] = float(records["logits"][i])
        features[p] = [float(x) for x in records["features"][i]]
    return dict(response_mask=mask, spd_draft_tokens=draft, spd_target_tokens=target, spd_actions=actions,
                spd_old_logits=logits, spd_features=features)


class SPDAgentLoop(SingleTurnAgentLoop):
    """Single-turn chat through the spd rollout; decisions become the response mask."""

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        output = await super().run(sampling_params, **kwargs)
        extra = dict(output.extra_fields)
        records = extra.pop(DECISIONS_KEY, None)
        target_logprobs = extra.pop(TARGET_LOGPROBS_KEY, None)  # per token: only the credit needs them
        if records is None:
            raise ValueError(f"no decision records in the rollout output: the {AGENT_NAME} agent loop needs "
                             f"actor_rollout_ref.rollout.name=spd and trainer.v1.trainer_mode=spd (verl's async "
                             f"trainer modes rebuild the rollout output and drop its extra fields)")
        length = len(output.response_ids)
        fields = decision_fields(records, length)
        logprobs = output.response_logprobs
        if logprobs is None or len(logprobs) != length:
            raise ValueError(f"spd rollout returned {None if logprobs is None else len(logprobs)} decision "
                             f"log-probs for a response of {length} tokens")
        if float(sampling_params.get("temperature", 0.0)) > 0:  # training rollouts only
            soft_terms: dict[int, float] = {}
            credit = await self._decision_credit(output, records, kwargs, target_logprobs, soft_terms,
                                                  sampling_params)
            if credit is not None:
                fields[CREDIT_KEY] = [float(credit.get(p, 0.0)) for p in range(length)]
                centre = credit_config_from(self.config).soft_center
                if centre:  # the soft terms stay out of δ; the trainer centres and adds them
                    fields[CREDIT_SOFT_KEY] = [float(soft_terms.get(p, 0.0)) for p in range(length)]
                    fields[CREDIT_BRANCHED_KEY] = [float(p in credit) for p in range(length)]
                extra["spd_branches"] = len(credit)
                # answer-deciding: the two branches differ by a correct answer (or the length penalty)
                extra["spd_branch_decisive"] = sum(1 for p, v in credit.items()
                                                   if abs(v - (0.0 if centre else soft_terms.get(p, 0.0))) >= 0.5)
                if soft_terms:
                    extra["spd_branch_soft"] = sum(soft_terms.values())
        data = output.model_dump(exclude={"response_mask", "extra_fields"})
        data["metrics"] = output.metrics
        return SPDAgentLoopOutput(**data, **fields, extra_fields=extra)

    async def _decision_credit(self, output, records: dict, kwargs: dict, target_logprobs,
                               soft_terms: dict, sampling_params: dict) -> dict[int, float] | None:
        cfg = credit_config_from(self.config)
        if not cfg.branches:
            return None
        ground_truth = (kwargs.get("reward_model") or {}).get("ground_truth")
        if ground_truth is None:
            raise ValueError(f"spd.credit.branches={cfg.branches} needs reward_model.ground_truth in every row "
                             f"(data_source={kwargs.get('data_source')!r}, extra_info={kwargs.get('extra_info')!r})")

        async def generate(prompt_ids, sampling_params) -> Continuation:
            out = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                     sampling_params=sampling_params)
            extra = out.extra_fields
            return Continuation(list(out.token_ids), int(extra["spd_mismatches"]), bool(extra["spd_truncated"]),
                                extra.get(TARGET_LOGPROBS_KEY), accepted=int(extra["spd_accepted_mismatches"]),
                                run_tokens=int(extra["spd_accepted_run_tokens"]))

        # Which decisions get branched: a function of the rollout itself, so a run is repeatable.
        rng = random.Random(zlib.crc32(bytes(str(output.response_ids), "ascii")))
        return await decision_credit(
            generate, self.tokenizer, list(output.prompt_ids), list(output.response_ids), records, ground_truth,
            rollout_truncated=bool(output.extra_fields["spd_truncated"]), max_tokens=self.response_length,
            branches=cfg.branches, rng=rng, reward_cfg=reward_config_from(self.config),
            gamma=self.rollout_config.num_speculative_tokens, pick=cfg.pick, soft_coef=cfg.soft_coef,
            number_ids=self._number_ids() if cfg.soft_coef else frozenset(),
            response_target_logprobs=target_logprobs, soft_terms=soft_terms, soft_in_delta=not cfg.soft_center,
            rest=cfg.rest, policy_params=dict(sampling_params))

    def _number_ids(self) -> frozenset[int]:
        if getattr(self, "_number_ids_cache", None) is None:
            self._number_ids_cache = number_token_ids(self.tokenizer)
        return self._number_ids_cache
