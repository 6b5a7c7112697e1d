"""Which problems of a split each calibrated pick answers differently from lossless SD.

A pick that misses the held-out bar by one answer: are its lost answers noise of its own, or
problems every judge of the recipe breaks? This decodes the split losslessly and with each pick
(the records scripts/fresh_check.py reads) and lists, per pick, the problems it loses and gains,
then the ones every pick loses (README: Results, session 21).

    python scripts/lost_answers.py runs/demo/held_out_eval.json RUN2/held_out_eval.json --split test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.reward import is_correct
from spd_verl.spd import RejectAll
from spd_verl.world import load_world

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package: share fresh_check's reader
from fresh_check import picks  # noqa: E402


def wrong_answers(rule: Rule, judge, world, rows: list[dict], **kw) -> tuple[set[int], dict]:
    """Row indices ``rule`` answers wrongly, and its evaluation row (without the outputs)."""
    row = evaluate([rule], world.draft, world.target, judge, world.tokenizer, rows, keep_outputs=True, **kw)[0]
    wrong = {i for i, (text, r) in enumerate(zip(row.pop("outputs"), rows)) if not is_correct(text, r["ground_truth"])}
    row.pop("response_ids")
    return wrong, row


def answer_diff(entries: list[dict], world, rows: list[dict], **kw) -> dict:
    """Lossless SD's wrong answers per γ, and per pick its wrong, lost and gained row indices."""
    lossless, out = {}, []
    for e in entries:
        g = e["gamma"]
        if g not in lossless:
            lossless[g] = wrong_answers(Rule.fixed("reject_all", RejectAll()), None, world, rows, gamma=g, **kw)[0]
        p = e["pick"]
        wrong, row = wrong_answers(judge_rule(p["setting"], p.get("min_run", 1)),
                                   load_eval_judge(e["judge"], world.target), world, rows, gamma=g, **kw)
        out.append(dict(name=f"{e['name']}: {p['name']}", judge=e["judge"], gamma=g, accuracy=row["accuracy"],
                        tau=row["tau"], wrong=sorted(wrong), lost=sorted(wrong - lossless[g]),
                        gained=sorted(lossless[g] - wrong)))
    every = set.intersection(*(set(o["lost"]) for o in out)) if out else set()
    return dict(lossless_wrong={g: sorted(w) for g, w in lossless.items()}, picks=out, lost_by_every_pick=sorted(every))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path, nargs="+", help="held_out_eval.json or calibrate_checkpoints.py records")
    ap.add_argument("--split", default="test", help="the world's split to decode")
    ap.add_argument("--limit", type=int, default=None, help="the split's first N problems (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=400)
    ap.add_argument("--out", type=Path, help="write the lists here (JSON)")
    args = ap.parse_args(argv)
    entries = [e for path in args.records for e in picks(path)]
    world = load_world()
    rows = load_rows(world.split(args.split), args.limit)
    res = answer_diff(entries, world, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      eos_token_id=world.eos_token_id, progress=False)
    for g, w in res["lossless_wrong"].items():
        print(f"lossless SD, γ {g}: {len(rows) - len(w)} of {len(rows)} right; wrong: {w}")
    print("| pick | accuracy / τ | lost | gained |\n| --- | --- | --- | --- |")
    for o in res["picks"]:
        print(f"| {o['name']} (γ {o['gamma']}) | {100 * o['accuracy']:.1f}% / {o['tau']:.3f} | {o['lost']} | {o['gained']} |")
    print(f"lost by every pick: {res['lost_by_every_pick']}")
    if args.out is not None:
        args.out.write_text(json.dumps(dict(split=args.split, n=len(rows), **res), indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
