"""SPD metrics over a batch of sequences (DESIGN.md §3): τ, mismatches, accepted-mismatch rate,
target forwards per token, response length, accuracy. Pooled over the batch (ratios of sums)."""

from __future__ import annotations

import math


def spd_summary(rows: list[dict], prefix: str) -> dict[str, float]:
    """rows: one dict per sequence with ``mismatches``, ``accepted_mismatches``,
    ``target_forwards``, ``response_length`` and optionally ``correct`` / ``truncated``."""
    if not rows:
        return {}
    n = len(rows)
    total = {k: sum(float(r.get(k) or 0.0) for r in rows)
             for k in ("mismatches", "accepted_mismatches", "forced_rejects", "accepted_run_tokens", "target_forwards",
                       "response_length", "truncated")}
    out = {
        "tau": total["response_length"] / total["target_forwards"] if total["target_forwards"] else 0.0,
        "mismatches_per_seq": total["mismatches"] / n,
        "accepted_mismatch_rate": total["accepted_mismatches"] / total["mismatches"] if total["mismatches"] else 0.0,
        "target_forwards_per_token": total["target_forwards"] / total["response_length"]
        if total["response_length"] else 0.0,
        "target_forwards_per_seq": total["target_forwards"] / n,
        "response_length": total["response_length"] / n,
        "truncated_rate": total["truncated"] / n,
        "sequences_without_decision": sum(1 for r in rows if not r.get("mismatches")) / n,
    }
    if total["accepted_mismatches"] and any(r.get("accepted_run_tokens") is not None for r in rows):
        # draft tokens an accept kept in its block, on average: what an accept buys (gated_run pays it)
        out["tokens_per_accept"] = total["accepted_run_tokens"] / total["accepted_mismatches"]
    if any(r.get("forced_rejects") is not None for r in rows):  # behind a run gate (rollout.min_accept_run)
        out["forced_reject_rate"] = total["forced_rejects"] / total["mismatches"] if total["mismatches"] else 0.0
    batch = [float(r["batch_size"]) for r in rows if r.get("batch_size") is not None]
    if batch:  # sequences per engine call on the rollout server (its request batching at work)
        out["server_batch_size"] = sum(batch) / len(batch)
    branches = sum(float(r.get("branches") or 0) for r in rows)
    if branches:  # per-decision credit (credit.py): share of branched decisions that decided the answer
        out["credit_branches_per_seq"] = branches / n
        out["credit_decisive_rate"] = sum(float(r.get("branch_decisive") or 0) for r in rows) / branches
        soft = [float(r["branch_soft"]) for r in rows if r.get("branch_soft") is not None]
        if soft:  # mean soft-risk term per branched decision (negative: accepts made the target less sure)
            out["credit_soft_term"] = sum(soft) / branches
    correct = [float(r["correct"]) for r in rows if r.get("correct") is not None]
    if correct:
        out["accuracy"] = sum(correct) / len(correct)
    return {f"{prefix}/{k}": v for k, v in out.items()}


def rows_from_extra_fields(extra_fields: list[dict], response_lengths: list[int]) -> list[dict]:
    """Training batch: the rollout's per-sequence stats (+ the reward's ``correct``)."""
    rows = []
    for extra, length in zip(extra_fields, response_lengths, strict=True):
        extra = extra if isinstance(extra, dict) else {}
        reward_info = extra.get("reward_extra_info") or {}
        rows.append(dict(mismatches=extra.get("spd_mismatches"), accepted_mismatches=extra.get("spd_accepted_mismatches"),
                         forced_rejects=extra.get("spd_forced_rejects"),
                         accepted_run_tokens=extra.get("spd_accepted_run_tokens"),
                         target_forwards=extra.get("spd_target_forwards"), truncated=extra.get("spd_truncated"),
                         response_length=length, correct=reward_info.get("correct"),
                         batch_size=extra.get("spd_batch_size"), branches=extra.get("spd_branches"),
                         branch_decisive=extra.get("spd_branch_decisive"), branch_soft=extra.get("spd_branch_soft")))
    return rows


def rows_from_reward_infos(infos: dict[str, list]) -> list[dict]:
    """Validation: verl keeps only the reward's extra info per sample (reward terms of
    ``spd_verl.reward.compute_spd_reward``: mismatches, accepted_mismatches, tau, response_length,
    correct); target forwards are response_length / tau."""
    needed = ("mismatches", "accepted_mismatches", "tau", "response_length")
    if not all(k in infos for k in needed):
        return []
    def optional(key: str, i: int):  # a term the reward kind may not report
        return (infos.get(key) or [None] * (i + 1))[i]

    rows = []
    for i in range(len(infos["tau"])):
        tau, length = infos["tau"][i], infos["response_length"][i]
        if tau is None or length is None or (isinstance(tau, float) and math.isnan(tau)):
            continue
        rows.append(dict(mismatches=infos["mismatches"][i], accepted_mismatches=infos["accepted_mismatches"][i],
                         target_forwards=length / tau if tau else 0.0, response_length=length,
                         truncated=optional("overlong", i), accepted_run_tokens=optional("accepted_run_tokens", i),
                         correct=optional("correct", i)))
    return rows
