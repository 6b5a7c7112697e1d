"""The evaluation's decoding processes (``spd.eval.workers``): one split decoded by one process with
torch's threads and by forked workers with one thread each (spd_verl.eval.parallel), interleaved in
this process so machine noise hits both alike. The rows must agree exactly; prints seconds and the
ratio against one process.

    .venv/bin/python benchmarks/bench_eval_workers.py [--split calib] [--workers 1,2] [--repeats 2] [--judge DIR]

Without ``--judge`` the rule is lossless SD (a clean clone has no trained judge); with one, the
judge at ``--threshold`` behind run gate ``--min-run``, as the calibration decodes it.
"""

from __future__ import annotations

import argparse
import time

from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.spd import RejectAll
from spd_verl.world import load_world

KEYS = ("correct", "emitted_tokens", "target_forwards", "mismatches", "accepted_mismatches")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="calib")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=400)
    ap.add_argument("--judge", default=None, help="a judge export; default: lossless SD")
    ap.add_argument("--threshold", type=float, default=0.4)
    ap.add_argument("--min-run", type=int, default=3)
    ap.add_argument("--world", default=None)
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    world = load_world(args.world)
    rows = load_rows(world.split(args.split))
    judge = None if args.judge is None else load_eval_judge(args.judge, world.target)
    rule = Rule.fixed("reject_all", RejectAll()) if judge is None else judge_rule(args.threshold, args.min_run)
    kw = dict(gamma=args.gamma, max_new_tokens=96, batch_size=args.batch_size, eos_token_id=world.eos_token_id,
              progress=False, keep_outputs=True)
    secs, results = {w: [] for w in counts}, {}
    for _ in range(args.repeats):
        for w in counts:
            t = time.perf_counter()
            r = evaluate([rule], world.draft, world.target, judge, world.tokenizer, rows, workers=w, **kw)[0]
            secs[w].append(time.perf_counter() - t)
            results.setdefault(w, ({k: r[k] for k in KEYS}, r["response_ids"]))
    base = counts[0]
    for w in counts[1:]:
        if results[w] != results[base]:
            raise SystemExit(f"{w} workers decoded differently from {base}: {results[w][0]} vs {results[base][0]}")
    print(f"{len(rows)} {args.split} problems, γ {args.gamma}, {rule.name}, batch {args.batch_size}, "
          f"best of {args.repeats}; every response identical")
    print(f"| workers | seconds | speed-up vs {base} |\n| --- | --- | --- |")
    for w in counts:
        print(f"| {w} | {min(secs[w]):.2f} | {min(secs[base]) / min(secs[w]):.2f}× |")


if __name__ == "__main__":
    main()
