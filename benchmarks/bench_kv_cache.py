"""The engine's KV cache: Hugging Face's DynamicCache (a ``torch.cat`` of the whole cache every
forward) against cache.py's preallocated buffers written in place (the default), interleaved in this
process so machine noise hits both alike. The decoded rows must agree exactly; prints seconds and the ratio.

    .venv/bin/python benchmarks/bench_kv_cache.py [--split calib] [--n 800] [--batch 400] [--repeats 2] [--gamma 8]

The rule is lossless SD (reject_all, a calibration's baseline row): a clean clone has no trained judge.
On a machine shared with other jobs, OMP_NUM_THREADS=1 keeps torch's threads from fighting them.
"""

from __future__ import annotations

import argparse
import time

from spd_verl.eval.data import load_rows
from spd_verl.eval.sweep import Rule, evaluate
from spd_verl.spd import RejectAll
from spd_verl.world import load_world

KEYS = ("correct", "emitted_tokens", "target_forwards", "mismatches", "draft_acceptance_rate", "response_ids")
CACHES = {"DynamicCache (torch.cat)": False, "preallocated (in place)": True}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="calib")
    ap.add_argument("--n", type=int, default=800, help="problems of the split to decode (0 = all)")
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--world", default=None)
    args = ap.parse_args(argv)
    world = load_world(args.world)
    rows = load_rows(world.split(args.split))
    rows = rows[:args.n] if args.n else rows
    kw = dict(gamma=args.gamma, max_new_tokens=args.max_new_tokens, eos_token_id=world.eos_token_id,
              batch_size=args.batch, progress=False, keep_outputs=True)
    secs, results = {name: [] for name in CACHES}, {}
    for _ in range(args.repeats):
        for name, pre in CACHES.items():
            t = time.perf_counter()
            r = evaluate([Rule.fixed("reject_all", RejectAll())], world.draft, world.target, None, world.tokenizer, rows,
                         decoder_kwargs=dict(preallocate_cache=pre), **kw)[0]
            secs[name].append(time.perf_counter() - t)
            results.setdefault(name, {k: r[k] for k in KEYS})
        old, new = results.values()
        if new != old:
            diff = [k for k in KEYS if new[k] != old[k]]
            raise SystemExit(f"the preallocated cache decoded differently: {diff} differ")
    base = next(iter(CACHES))
    print(f"{len(rows)} {args.split} problems, batch {args.batch}, γ {args.gamma}, max_new_tokens "
          f"{args.max_new_tokens}, lossless SD, best of {args.repeats}; rows identical")
    print(f"| KV cache | seconds | speed-up vs {base} |\n| --- | --- | --- |")
    for name in CACHES:
        print(f"| {name} | {min(secs[name]):.2f} | {min(secs[base]) / min(secs[name]):.2f}× |")
    print("every run (s): " + "; ".join(f"{name}: " + ", ".join(f"{t:.2f}" for t in secs[name]) for name in CACHES))


if __name__ == "__main__":
    main()
