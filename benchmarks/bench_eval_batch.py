"""The held-out evaluation's decode batch (``spd.eval.batch_size``): one split decoded in batches of
32 (spd-eval's default) and in one batch, interleaved in this process so machine noise hits both
alike. The rows must agree exactly (the engine is batch-invariant); prints seconds and the ratio.

    .venv/bin/python benchmarks/bench_eval_batch.py [--split calib] [--sizes 32,400] [--repeats 2] [--gamma 8]

The rule is lossless SD (reject_all, a calibration's baseline row): a clean clone has no trained judge.
"""

from __future__ import annotations

import argparse
import time

from spd_verl.eval.data import load_rows
from spd_verl.eval.sweep import Rule, evaluate
from spd_verl.spd import RejectAll
from spd_verl.world import load_world

KEYS = ("correct", "emitted_tokens", "target_forwards")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="calib")
    ap.add_argument("--sizes", default="32,400", help="comma-separated batch sizes; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--world", default=None)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    world = load_world(args.world)
    rows = load_rows(world.split(args.split))
    kw = dict(gamma=args.gamma, max_new_tokens=96, eos_token_id=world.eos_token_id, progress=False)
    secs, results = {s: [] for s in sizes}, {}
    for _ in range(args.repeats):
        for size in sizes:
            t = time.perf_counter()
            r = evaluate([Rule.fixed("reject_all", RejectAll())], world.draft, world.target, None, world.tokenizer, rows,
                         batch_size=size, **kw)[0]
            secs[size].append(time.perf_counter() - t)
            results.setdefault(size, {k: r[k] for k in KEYS})
    base = sizes[0]
    for size in sizes[1:]:
        if results[size] != results[base]:
            raise SystemExit(f"batch {size} decoded differently from batch {base}: {results[size]} vs {results[base]}")
    print(f"{len(rows)} {args.split} problems, γ {args.gamma}, lossless SD, best of {args.repeats}")
    print("| batch | seconds | speed-up vs batch " + str(base) + " |\n| --- | --- | --- |")
    for size in sizes:
        print(f"| {size} | {min(secs[size]):.2f} | {min(secs[base]) / min(secs[size]):.2f}× |")


if __name__ == "__main__":
    main()
