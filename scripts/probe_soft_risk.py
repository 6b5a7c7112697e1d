"""Probe the credit's soft risk (spd_verl/verl_ext/credit.py) on the demo world, without training.

Decodes problems with the non-digit hand rule, then branches *every* accepted mismatch the way
the credit does: two lossless continuations of the rollout's prefix, one with the draft token
(taken) and one with the target's (flipped). Per draft wording it prints how often the accept
broke the answer (the hard δ) and the mean soft-risk difference, and the AUC with which the soft
difference ranks the accepts that broke an answer above the rest.

    python scripts/probe_soft_risk.py --data spd_verl/assets/world/data/train.parquet --limit 300
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from spd_verl.eval.data import load_rows, prompt_ids
from spd_verl.reward import is_correct
from spd_verl.spd import RejectAll, SpeculativeDecoder
from spd_verl.verl_ext.credit import number_token_ids, soft_risk
from spd_verl.world import load_world
from spd_verl.world.oracle import NonDigitRule


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half."""
    p, n = torch.tensor(pos)[:, None], torch.tensor(neg)[None, :]
    return float((p > n).float().mean() + 0.5 * (p == n).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="verl parquet with prompts and ground truths")
    ap.add_argument("--limit", type=int, default=300, help="first N problems")
    ap.add_argument("--gamma", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--world", default=None, help="world directory (default: the packaged one)")
    ap.add_argument("--out", default=None, help="write the per-wording table as JSON here")
    args = ap.parse_args(argv)

    world = load_world(args.world)
    tok, eos, budget = world.tokenizer, world.eos_token_id, args.max_new_tokens
    numbers = number_token_ids(tok)
    rows = load_rows(args.data, limit=args.limit)
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
    decoder = SpeculativeDecoder(world.draft, world.target, num_speculative_tokens=args.gamma)
    rule = decoder.generate(prompts, NonDigitRule(tok), max_new_tokens=budget, eos_token_id=eos)
    items = [(b, p, d, t) for b, rec in enumerate(rule.decisions)
             for p, d, t, a in zip(rec.positions, rec.draft_tokens, rec.target_tokens, rec.actions)
             if a and p + 1 < budget]

    def branch(token_of) -> tuple[list[bool], list[float]]:
        heads = [rule.responses[b][:p] + [token_of(d, t)] for b, p, d, t in items]
        out = decoder.generate([prompts[b] + h for (b, *_), h in zip(items, heads)], RejectAll(),
                               max_new_tokens=[budget - len(h) for h in heads], eos_token_id=eos)
        correct = [bool(is_correct(tok.decode(h + c, skip_special_tokens=True), rows[b]["ground_truth"]))
                   for (b, *_), h, c in zip(items, heads, out.responses)]
        risk = [soft_risk(c, lp, numbers) for c, lp in zip(out.responses, out.target_logprobs)]
        return correct, risk

    ok_taken, risk_taken = branch(lambda d, t: d)
    ok_flipped, risk_flipped = branch(lambda d, t: t)
    by = collections.defaultdict(lambda: {"accepts": 0, "broken": 0, "saved": 0, "delta_risk": 0.0})
    broken, safe = [], []
    for k, (b, p, d, t) in enumerate(items):
        harm = int(ok_flipped[k]) - int(ok_taken[k])
        delta = risk_taken[k] - risk_flipped[k]
        e = by[tok.convert_ids_to_tokens(d)]
        e["accepts"] += 1
        e["broken"] += harm == 1   # the taken accept lost an answer the target's token keeps
        e["saved"] += harm == -1   # the other way round: the accept rescued a lost answer
        e["delta_risk"] += delta
        (broken if harm == 1 else safe).append(delta)
    accuracy = sum(is_correct(tok.decode(r, skip_special_tokens=True), rows[i]["ground_truth"])
                   for i, r in enumerate(rule.responses)) / len(rows)
    print(f"{len(rows)} problems, non-digit rule accuracy {accuracy:.2%}, {len(items)} accepted mismatches, "
          f"{len(broken)} broke the answer")
    print(f"{'draft':>8} {'accepts':>8} {'broken':>7} {'rate':>7} {'saved':>6} {'mean Δrisk':>11}")
    table = {}
    for word, e in sorted(by.items(), key=lambda kv: -kv[1]["accepts"]):
        e["delta_risk"] /= e["accepts"]
        table[word] = e
        print(f"{word:>8} {e['accepts']:8d} {e['broken']:7d} {e['broken'] / e['accepts']:7.2%} {e['saved']:6d} "
              f"{e['delta_risk']:+11.4f}")
    result = {"problems": len(rows), "accuracy": accuracy, "accepts": len(items), "broken": len(broken),
              "by_draft_wording": table}
    if broken and safe:
        result["auc"] = auc(broken, safe)
        print(f"AUC of Δrisk for 'broke the answer': {result['auc']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
