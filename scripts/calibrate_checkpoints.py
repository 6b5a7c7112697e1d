"""Calibrate every judge a run saved, as spd-train calibrates the last one, and show what each gives.

For each ``CHECKPOINTS/global_step_N/judge``: the two-stage threshold choice of
``spd_verl.eval.calibrate`` (coarse grid on the val split, fine window on the calib split), then,
as a diagnostic only, the held-out split at that threshold. Answers "would choosing the training
step on held-in data help?" (README: Results, session 9). Train with ``trainer.save_freq=10`` to
have something to choose from.

    python scripts/calibrate_checkpoints.py runs/demo/checkpoints --out runs/demo/checkpoints.json
    python scripts/calibrate_checkpoints.py RUN/checkpoints --gamma 8 --steps 60 --min-runs 1,5,6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spd_verl.eval.__main__ import _floats, _run_gates
from spd_verl.eval.calibrate import COARSE_GRID, calibrate
from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.spd import RejectAll
from spd_verl.train import CALIBRATION_TOL, judge_exports
from spd_verl.world import load_world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, help="a run's checkpoint directory (trainer.default_local_dir)")
    ap.add_argument("--gamma", type=int, default=6, help="num_speculative_tokens of every decode (README session 10: "
                    "a judge trained at 6 can be calibrated and evaluated at 8)")
    ap.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",")],
                    help="comma-separated steps to calibrate (default: every saved judge)")
    ap.add_argument("--min-runs", type=_run_gates, default=[1],
                    help="run gates the calibration chooses among with the threshold (spd.RunGated; 1 = none)")
    ap.add_argument("--grid", type=_floats("--grid"), default=COARSE_GRID,
                    help="the coarse stage's thresholds (default: spd_verl.eval.calibrate.COARSE_GRID)")
    ap.add_argument("--fine-tol", type=float, default=None,
                    help="accuracy tolerance of the pick on the calib split (default: the target's 0.01; "
                    "spd.eval.fine_tol)")
    ap.add_argument("--tau-floor", type=float, default=None,
                    help="deploy for this speed-up over lossless SD: the most accurate setting with τ at least this "
                    "many times lossless τ on the calib split (spd.eval.tau_floor; default: the most τ)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=400,
                    help="prompts per generate call (spd.eval.batch_size; the results do not depend on it)")
    ap.add_argument("--workers", type=int, default=2,
                    help="decoding processes (forked, CPU only; spd.eval.workers; the results do not depend on it)")
    ap.add_argument("--world", default=None, help="world directory (default: the packaged one)")
    ap.add_argument("--out", type=Path, help="write every checkpoint's record here (JSON)")
    args = ap.parse_args(argv)
    if any(m > args.gamma for m in args.min_runs):
        raise SystemExit(f"--min-runs {args.min_runs}: every gate must be in [1, --gamma {args.gamma}]")
    exports = judge_exports(args.checkpoints)
    if args.steps is not None:
        missing = sorted(set(args.steps) - {step for step, _ in exports})
        if missing:
            raise SystemExit(f"--steps {missing}: no judge export for those steps under {args.checkpoints} "
                             f"(saved: {[step for step, _ in exports]})")
        exports = [(step, path) for step, path in exports if step in args.steps]
    world = load_world(args.world)
    kw = dict(gamma=args.gamma, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, workers=args.workers,
              eos_token_id=world.eos_token_id, progress=False)
    val, calib, test = (load_rows(world.split(s)) for s in ("val", "calib", "test"))
    lossless = evaluate([Rule.fixed("reject_all", RejectAll())], world.draft, world.target, None, world.tokenizer,
                        test, **kw)[0]
    print(f"held-out lossless: {100 * lossless['accuracy']:.1f}% / τ {lossless['tau']:.3f}")
    print("| step | rule chosen (val + calib) | calib split there | held-out there (diagnostic) |")
    print("| --- | --- | --- | --- |")
    records = []
    for step, path in exports:
        judge = load_eval_judge(path, world.target)
        pick, coarse, fine = calibrate(world.draft, world.target, judge, world.tokenizer, val, tol=CALIBRATION_TOL,
                                       fine_rows=calib, fine_tol=args.fine_tol, min_runs=args.min_runs, grid=args.grid,
                                       tau_floor=args.tau_floor, **kw)
        rec = dict(step=step, judge=str(path), pick=pick, coarse=coarse, fine=fine)
        if pick is None:
            print(f"| {step} | none keeps the bar | — | — |")
        else:
            held = evaluate([judge_rule(pick["setting"], pick["min_run"])], world.draft, world.target, judge,
                            world.tokenizer, test, **kw)[0]
            rec["held_out"] = held
            print(f"| {step} | {pick['name']} | {100 * pick['accuracy']:.2f}% / {pick['tau']:.3f} | "
                  f"{100 * held['accuracy']:.1f}% / {held['tau']:.3f} ({held['tau'] / lossless['tau']:.2f}×) |",
                  flush=True)
        records.append(rec)
    if args.out is not None:
        args.out.write_text(json.dumps(dict(gamma=args.gamma, min_runs=args.min_runs, grid=list(args.grid),
                                            fine_tol=args.fine_tol, tau_floor=args.tau_floor,
                                            held_out_lossless=lossless, checkpoints=records), indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
