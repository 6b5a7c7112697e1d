"""The sweep: every acceptance rule at every setting, on one held-out set, through one engine.

A *rule* is a family (``judge``, ``reject_all``, ``accept_all``, ``target_prob``, ``typical``,
``oracle``, ``hand_rule``) at one setting (a threshold / eps, or None), optionally behind the run
gate (``min_run`` > 1: spd.RunGated). Each rule runs as its own ``SpeculativeDecoder.generate``
calls over the set in batches, and yields one result row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from spd_verl.reward import is_correct
from spd_verl.spd import (AcceptAll, Policy, RejectAll, SpeculativeDecoder, TargetProbPolicy, ThresholdPolicy,
                          TypicalPolicy, run_gated)

from .data import DEMO_DATA_SOURCE, prompt_ids
from .parallel import batch_slices, check_cpu, check_workers, fork_map

SWEPT = ("judge", "target_prob", "typical")  # families with a swept setting (a curve on the plot)
SINGLE = ("reject_all", "accept_all", "oracle", "hand_rule")  # one point each
COLUMNS = ("rule", "setting", "min_run", "name", "n", "accuracy", "tau", "accepted_mismatch_rate", "mismatches_per_seq",
           "mean_response_length", "target_forwards_per_token", "draft_acceptance_rate", "wall_time_s",
           "correct", "emitted_tokens", "target_forwards", "mismatches", "accepted_mismatches", "nan_logits")

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TARGET_PROB_EPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4)
DEFAULT_TYPICAL_EPS = (0.01, 0.03, 0.09, 0.2, 0.3, 0.5)


@dataclass
class Rule:
    """One row of the sweep. ``make(batch_rows) -> Policy`` builds the policy for one batch
    (reference rules such as the oracle need that batch's ground truths); ``min_run`` > 1 means
    the policy accepts behind ``RunGated(..., min_run)``."""

    family: str
    setting: float | None
    make: Callable[[list[dict]], Policy]
    name: str
    min_run: int = 1

    @classmethod
    def fixed(cls, family: str, policy: Policy, setting: float | None = None, min_run: int = 1) -> "Rule":
        policy = run_gated(policy, min_run)
        return cls(family, setting, lambda _rows: policy, policy.name, min_run)

    @property
    def needs_judge(self) -> bool:
        return self.family == "judge"


def judge_rule(threshold: float, min_run: int = 1) -> Rule:
    """The judge at ``threshold``, behind the run gate when ``min_run`` > 1."""
    return Rule.fixed("judge", ThresholdPolicy(threshold), threshold, min_run)


def build_rules(thresholds=DEFAULT_THRESHOLDS, target_prob_eps=DEFAULT_TARGET_PROB_EPS,
                typical_eps=DEFAULT_TYPICAL_EPS, with_judge: bool = True, min_runs=(1,)) -> list[Rule]:
    """The standard sweep: judge thresholds, reject_all, accept_all, target-prob and typical sweeps;
    every accepting family once per ``min_runs`` entry (1 = no run gate)."""
    rules = []
    for m in min_runs:
        if with_judge:
            rules += [judge_rule(t, m) for t in thresholds]
    rules.append(Rule.fixed("reject_all", RejectAll()))
    for m in min_runs:
        rules.append(Rule.fixed("accept_all", AcceptAll(), min_run=m))
        rules += [Rule.fixed("target_prob", TargetProbPolicy(e), e, m) for e in target_prob_eps]
        rules += [Rule.fixed("typical", TypicalPolicy(e), e, m) for e in typical_eps]
    return rules


def reference_rules(rows, target, tokenizer, max_new_tokens: int, eos_token_id, log=print,
                    min_runs=(1,)) -> list[Rule]:
    """On the demo world: the single-swap oracle and the non-digit hand rule (DESIGN.md §8; the
    hand rule once per ``min_runs`` entry), when ``spd_verl.world.oracle`` provides them; otherwise
    [] with a printed note."""
    sources = {r["data_source"] for r in rows}
    if sources != {DEMO_DATA_SOURCE}:
        return []
    try:
        from spd_verl.world.oracle import NonDigitRule, SingleSwapOracle
    except ImportError as e:
        log(f"note: oracle / hand-rule reference rows skipped (spd_verl.world.oracle unavailable: {e})")
        return []

    def oracle(batch):
        return SingleSwapOracle(target, tokenizer, [r["ground_truth"] for r in batch], max_new_tokens, eos_token_id)

    hand = NonDigitRule(tokenizer)
    return [Rule("oracle", None, oracle, "oracle")] + [Rule.fixed("hand_rule", hand, min_run=m) for m in min_runs]


def evaluate(rules: list[Rule], draft, target, judge, tokenizer, rows: list[dict], gamma: int = 4,
             max_new_tokens: int = 128, batch_size: int = 32, eos_token_id=None, progress: bool = True,
             decoder_kwargs: dict | None = None, keep_outputs: bool = False, workers: int = 1) -> list[dict]:
    """Run every rule over ``rows`` (normalised eval rows, see data.load_rows); one dict per rule
    with the columns of ``COLUMNS``. τ = total emitted tokens / total target forwards over the set.
    ``keep_outputs`` adds ``outputs`` (decoded responses) and ``response_ids`` per rule.
    ``workers`` > 1 decodes each rule's batches in that many forked CPU processes
    (:mod:`spd_verl.eval.parallel`; batches shrink to give every worker one); the rows are the same,
    ``wall_time_s`` is then the rule's elapsed time."""
    if not rows:
        raise ValueError("eval set is empty: no rows to evaluate")
    if not rules:
        raise ValueError("no rules to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(r.needs_judge for r in rules) and judge is None:
        raise ValueError("judge rules requested but no judge was given (pass --judge DIR or --no-judge)")
    check_workers(workers)
    check_cpu((draft, target, judge), workers)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    batches = [(rows[b], prompts[b]) for b in batch_slices(len(rows), batch_size, workers)]
    dec = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=gamma, **(decoder_kwargs or {}))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rules) * len(batches), unit="batch", desc="eval", dynamic_ncols=True)
    out = []
    try:
        for rule in rules:
            if bar is not None:
                bar.set_description(f"eval {rule.name}")
            acc = dict(correct=0, emitted_tokens=0, target_forwards=0, mismatches=0, accepted_mismatches=0,
                       draft_kept=0, draft_proposed=0, nan_logits=0)
            texts_all, ids_all = [], []

            def decode(i, rule=rule):
                batch_rows, batch_prompts = batches[i]
                res = dec.generate(batch_prompts, policy=rule.make(batch_rows), max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id)
                if bar is not None and workers == 1:
                    bar.update(1)
                return res.responses, {k: int(res.stats.get(k, 0)) for k in acc if k != "correct"}

            t0 = time.perf_counter()
            for (batch_rows, _), (responses, stats) in zip(batches, fork_map(decode, len(batches), workers)):
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                acc["correct"] += sum(is_correct(t, r["ground_truth"]) for t, r in zip(texts, batch_rows))
                if keep_outputs:
                    texts_all += texts
                    ids_all += responses
                for k, v in stats.items():
                    acc[k] += v
            if bar is not None and workers > 1:
                bar.update(len(batches))
            out.append(_row(rule, len(rows), acc, time.perf_counter() - t0))
            if keep_outputs:
                out[-1].update(outputs=texts_all, response_ids=ids_all)
    finally:
        if bar is not None:
            bar.close()
    return out


def _row(rule: Rule, n: int, a: dict, wall: float) -> dict:
    em, tf, mm = a["emitted_tokens"], a["target_forwards"], a["mismatches"]
    return dict(
        rule=rule.family, setting=rule.setting, min_run=rule.min_run, name=rule.name, n=n,
        accuracy=a["correct"] / n,
        tau=em / max(1, tf),
        accepted_mismatch_rate=a["accepted_mismatches"] / mm if mm else 0.0,
        mismatches_per_seq=mm / n,
        mean_response_length=em / n,
        target_forwards_per_token=tf / max(1, em),
        draft_acceptance_rate=a["draft_kept"] / max(1, a["draft_proposed"]),
        wall_time_s=wall,
        correct=a["correct"], emitted_tokens=em, target_forwards=tf, mismatches=mm,
        accepted_mismatches=a["accepted_mismatches"], nan_logits=a["nan_logits"],
    )
