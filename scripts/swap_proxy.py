"""Score every judge a run saved on the swap proxy (spd_verl.eval.swap_proxy): a bank built once from
lossless SD on held-in problems, then one forward per problem per judge; no decoding with the judges.

    python scripts/swap_proxy.py RUN/checkpoints --gamma 8 --out RUN/swap_proxy.json
    python scripts/swap_proxy.py RUN/checkpoints --bank /tmp/bank.pt    # reuse a bank across runs

What spd-train's ``spd.eval.proxy_keep`` uses to choose which saved judges to calibrate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.swap_proxy import DEFAULT_BUDGET, SwapBank, build_swap_bank, judge_logits, swap_score
from spd_verl.train import judge_exports
from spd_verl.world import load_world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+", help="run checkpoint directories (global_step_N/judge)")
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--split", default="calib", help="the world's split the bank's problems come from")
    ap.add_argument("--problems", type=int, default=400, help="the bank's problems: the split's first N")
    ap.add_argument("--budgets", default=f"0.00625,0.0125,{DEFAULT_BUDGET},0.05",
                    help="comma-separated proxy budgets (harmful swaps per bank problem) to report")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2,
                    help="decoding processes (forked, CPU only; spd.eval.workers; the same bank)")
    ap.add_argument("--bank", type=Path, help="a bank file: loaded when it exists (and matches --gamma), else written")
    ap.add_argument("--world", default=None, help="world directory (default: the packaged one)")
    ap.add_argument("--out", type=Path, help="write every judge's scores here (JSON)")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    world = load_world(args.world)
    if args.bank is not None and args.bank.exists():
        bank = SwapBank(**torch.load(args.bank))
        if bank.gamma != args.gamma:
            raise SystemExit(f"--bank {args.bank} was built at γ {bank.gamma}, not --gamma {args.gamma}")
        if bank.n_problems != args.problems:
            raise SystemExit(f"--bank {args.bank} was built on {bank.n_problems} problems, not --problems {args.problems}")
    else:
        t0 = time.time()
        rows = load_rows(world.split(args.split), limit=args.problems)
        bank = build_swap_bank(world.draft, world.target, world.tokenizer, rows, args.gamma, args.max_new_tokens,
                               world.eos_token_id, workers=args.workers)
        print(f"bank: {len(bank)} mismatches on {bank.n_problems} {args.split} problems, "
              f"{int(bank.harmful.sum())} harmful single swaps ({time.time() - t0:.0f} s)")
        if args.bank is not None:
            torch.save(dataclasses.asdict(bank), args.bank)
    records = []
    print("| judge | " + " | ".join(f"proxy @ {b:g}" for b in budgets) + " |\n|" + " --- |" * (len(budgets) + 1))
    for ckpt in args.checkpoints:
        for step, path in judge_exports(ckpt):
            logits = judge_logits(load_eval_judge(path, world.target), bank)
            scores = {b: swap_score(logits, bank, b) for b in budgets}
            records.append(dict(judge=str(path), step=step, scores=scores))
            print(f"| {path} | " + " | ".join(f"{s:.3f}" for s in scores.values()) + " |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(dict(gamma=args.gamma, problems=bank.n_problems, split=args.split,
                                            mismatches=len(bank), harmful=int(bank.harmful.sum()),
                                            judges=records), indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
