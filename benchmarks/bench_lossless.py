"""Lossless continuations: lossless SD (``generate(RejectAll())``) against the target alone
(``generate_lossless``), on the requests the credit's branches and the swap bank send: a problem's
prompt plus a prefix of its lossless response, continued to the token budget. Both run in this
process, interleaved, so machine noise hits both alike; texts and counts must agree first.

    .venv/bin/python benchmarks/bench_lossless.py [--problems 64] [--per-problem 4] [--threads 1] [--repeats 3]

``--threads 1`` is the training rollout server's setting (Ray starts actors with one thread); the
batch (problems × per-problem) is one engine call's, as the server batches a step's branches.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from spd_verl.eval.data import load_rows, prompt_ids
from spd_verl.spd import RejectAll, SpeculativeDecoder
from spd_verl.world import load_world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--per-problem", type=int, default=4, help="continuations per problem (prefixes cut at random)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--split", default="train")
    ap.add_argument("--world", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = load_world(args.world)
    prompts = [prompt_ids(world.tokenizer, r["prompt"]) for r in load_rows(world.split(args.split), args.problems)]
    dec = SpeculativeDecoder(world.draft, world.target, num_speculative_tokens=args.gamma)
    kw = dict(eos_token_id=world.eos_token_id)
    full = dec.generate(prompts, RejectAll(), max_new_tokens=args.max_new_tokens, **kw).responses
    rng = random.Random(0)
    requests, limits = [], []
    for p, r in zip(prompts, full):
        for _ in range(args.per_problem):
            k = rng.randrange(1, len(r))
            requests.append(p + r[:k])
            limits.append(args.max_new_tokens - k)

    secs = {"lossless SD": [], "target alone": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        sd = dec.generate(requests, RejectAll(), max_new_tokens=limits, **kw)
        secs["lossless SD"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fast = dec.generate_lossless(requests, max_new_tokens=limits, **kw)
        secs["target alone"].append(time.perf_counter() - t)
        if fast.responses != sd.responses or fast.mismatches != [d.mismatches for d in sd.decisions] \
                or fast.target_forwards != [d.target_forwards for d in sd.decisions]:
            raise SystemExit("the target alone decoded differently from lossless SD")
    base = min(secs["lossless SD"])
    print(f"{len(requests)} continuations ({args.problems} {args.split} problems × {args.per_problem}), γ {args.gamma}, "
          f"{args.threads} thread(s), best of {args.repeats}; texts, mismatches and target forwards identical")
    print("| decoder | seconds | speed-up |\n| --- | --- | --- |")
    for name, s in secs.items():
        print(f"| {name} | {min(s):.2f} | {base / min(s):.2f}× |")


if __name__ == "__main__":
    main()
