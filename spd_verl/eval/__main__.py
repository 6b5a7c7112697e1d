"""spd-eval: sweep the acceptance rules on a held-out set (DESIGN.md §7).

    spd-eval --judge runs/judge_export --out runs/eval            # demo world defaults
    spd-eval --no-judge --limit 64                                # baselines only
    spd-eval --judge J --calibrate-on val.parquet                 # + the threshold chosen on validation data
    spd-eval --judge J --calibrate-on val.parquet --calibrate-fine calib.parquet   # coarse on val, fine on calib
    spd-eval --judge J --gamma 8 --min-runs 1,5,6                 # every rule also behind the run gates 5 and 6
    python -m spd_verl.eval --judge J --draft D --target T --data test.parquet --gamma 6

Writes results.csv, results.json (rows, verdicts, run settings) and pareto.png under --out, and
prints a compact table plus one verdict per baseline.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from .sweep import DEFAULT_TARGET_PROB_EPS, DEFAULT_THRESHOLDS, DEFAULT_TYPICAL_EPS


def _floats(name):
    def parse(text: str) -> list[float]:
        try:
            vals = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"{name}: no values given")
        bad = [v for v in vals if not 0.0 < v < 1.0]
        if bad:
            raise argparse.ArgumentTypeError(f"{name}: every value must be in (0, 1), got {bad}")
        return vals
    return parse


def _run_gates(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min-runs: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--min-runs: every value must be an integer >= 1 (1 = no gate), got {text!r}")
    return vals


def _csv(vals) -> str:
    return ",".join(f"{v:g}" for v in vals)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something (not None/False, not already in the help)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spd-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help)
    p.add_argument("--judge", type=Path, help="trained judge: a ScoringModel Hugging Face export dir")
    p.add_argument("--no-judge", action="store_true", help="evaluate the baselines only")
    p.add_argument("--draft", type=Path, help="draft checkpoint dir (default: the demo world's)")
    p.add_argument("--target", type=Path, help="target checkpoint dir (default: the demo world's)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the target dir, else its sibling tokenizer/)")
    p.add_argument("--data", type=Path, help="held-out verl parquet (default: the demo world's data/test.parquet)")
    p.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens (draft tokens per block)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length cap")
    p.add_argument("--thresholds", type=_floats("--thresholds"), default=_csv(DEFAULT_THRESHOLDS),
                   help="judge thresholds on P(accept), comma-separated")
    p.add_argument("--target-prob-eps", type=_floats("--target-prob-eps"), default=_csv(DEFAULT_TARGET_PROB_EPS),
                   help="TargetProbPolicy eps values (accept iff p_target(draft) >= eps)")
    p.add_argument("--typical-eps", type=_floats("--typical-eps"), default=_csv(DEFAULT_TYPICAL_EPS),
                   help="TypicalPolicy epsilon values (delta = sqrt(epsilon))")
    p.add_argument("--min-runs", type=_run_gates, default="1",
                   help="run gates (spd.RunGated): every accepting rule is swept once per value, accepting only "
                        "where the accept keeps >= that many draft tokens of its block; 1 = no gate. With "
                        "--calibrate-on the calibration chooses the judge's gate among them too")
    p.add_argument("--no-reference", action="store_true", help="skip the oracle / hand-rule rows on the demo world")
    p.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--workers", type=int, default=1,
                   help="decoding processes (forked, CPU only; the results do not depend on it): 2 decodes the "
                        "tiny demo models ~1.3x faster on a 2-core CPU than one process with two threads")
    p.add_argument("--tol", type=float, default=0.01, help="accuracy tolerance of the verdicts (0.01 = 1 point)")
    p.add_argument("--fine-tol", type=float, default=None,
                   help="accuracy tolerance of the pick on --calibrate-fine (default: --tol); a tighter one is a "
                        "safety margin for the held-out bar")
    p.add_argument("--tau-floor", type=float, default=None,
                   help="deploy for this speed-up over lossless SD: the most accurate threshold on --calibrate-fine "
                        "with tau >= this many times lossless tau there (default: the most tau)")
    p.add_argument("--calibrate-on", type=Path,
                   help="calibration parquet (validation data, not --data): choose the judge threshold with the "
                        "most tau whose accuracy there stays within --tol of lossless, and add it to the sweep")
    p.add_argument("--calibrate-fine", type=Path,
                   help="a larger calibration parquet (not --data; e.g. the demo world's data/calib.parquet): "
                        "after the coarse grid on --calibrate-on, choose among thresholds around that pick here")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output directory")
    return p


def run(args, log=print) -> dict:
    """Everything the CLI does, from parsed args; returns {rows, verdicts, settings, paths}."""
    import torch

    from .data import (check_tokenizer_vocab, eos_token_id, load_causal_lm, load_eval_judge, load_rows,
                       load_tokenizer, resolve_world_defaults)
    from .pareto import lossless, mark_pareto, verdicts
    from .plot import plot_pareto
    from .report import format_table, write_csv, write_json
    from .parallel import check_workers
    from .sweep import build_rules, evaluate, judge_rule, reference_rules

    if args.judge is None and not args.no_judge:
        raise ValueError("--judge DIR is required (or pass --no-judge to evaluate the baselines only)")
    if args.gamma < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError(f"--gamma, --max-new-tokens and --batch-size must be >= 1 "
                         f"(got {args.gamma}, {args.max_new_tokens}, {args.batch_size})")
    long_gates = [m for m in args.min_runs if m > args.gamma]
    if long_gates:
        raise ValueError(f"--min-runs {long_gates} exceed --gamma {args.gamma}: an accept keeps at most γ draft tokens "
                         f"of its block, so such a gate never accepts")
    check_workers(args.workers, "--workers")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = resolve_world_defaults(args.draft, args.target, args.tokenizer, args.data)

    rows = load_rows(paths["data"], args.limit)
    target = load_causal_lm(paths["target"], "target", device)
    draft = load_causal_lm(paths["draft"], "draft", device)
    tokenizer = load_tokenizer(paths["tokenizer"])
    check_tokenizer_vocab(tokenizer, target, paths["tokenizer"])
    judge = None if args.no_judge else load_eval_judge(args.judge, target, device)
    eos = eos_token_id(tokenizer, target)

    calibration = None
    if args.calibrate_fine is not None and args.calibrate_on is None:
        raise ValueError("--calibrate-fine is the second stage of --calibrate-on: pass --calibrate-on VAL too")
    if args.fine_tol is not None and args.calibrate_fine is None:
        raise ValueError("--fine-tol is the bar of the --calibrate-fine stage: pass --calibrate-fine CALIB too")
    if args.tau_floor is not None and args.calibrate_fine is None:
        raise ValueError("--tau-floor chooses on the --calibrate-fine stage: pass --calibrate-fine CALIB too")
    if args.calibrate_on is not None:
        if judge is None:
            raise ValueError("--calibrate-on chooses a judge threshold: pass --judge DIR")
        calibration = _calibrate(args, paths["data"], draft, target, judge, tokenizer, eos, log)

    rules = build_rules(args.thresholds, args.target_prob_eps, args.typical_eps, with_judge=judge is not None,
                        min_runs=args.min_runs)
    if calibration is not None and "threshold" in calibration:
        picked = judge_rule(calibration["threshold"], calibration["min_run"])
        if picked.name not in {r.name for r in rules}:
            judges = sorted([r for r in rules if r.family == "judge"] + [picked], key=lambda r: (r.min_run, r.setting))
            rules = judges + [r for r in rules if r.family != "judge"]
    if not args.no_reference:
        rules += reference_rules(rows, target, tokenizer, args.max_new_tokens, eos, log=log, min_runs=args.min_runs)
    log(f"spd-eval: {len(rows)} rows from {paths['data']}, {len(rules)} rules, gamma={args.gamma}, "
        f"max_new_tokens={args.max_new_tokens}, batch_size={args.batch_size}, device={device}")

    results = evaluate(rules, draft, target, judge, tokenizer, rows, gamma=args.gamma,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, eos_token_id=eos,
                       progress=not args.no_progress, workers=args.workers)
    mark_pareto(results)
    verdict_rows = verdicts(results, tol=args.tol)

    base = lossless(results)
    settings = dict(
        judge=None if judge is None else str(args.judge), draft=str(paths["draft"]), target=str(paths["target"]),
        tokenizer=str(paths["tokenizer"]), data=str(paths["data"]), n=len(rows), limit=args.limit,
        gamma=args.gamma, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, eos_token_id=eos,
        workers=args.workers, thresholds=args.thresholds, target_prob_eps=args.target_prob_eps, typical_eps=args.typical_eps,
        min_runs=args.min_runs,
        tol=args.tol, device=device, torch_threads=torch.get_num_threads(),
        rules=[r["name"] for r in results], lossless_accuracy=base["accuracy"], lossless_tau=base["tau"],
        time=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    if calibration is not None:
        settings["calibration"] = calibration
    oracle = [r for r in results if r["rule"] == "oracle"]
    if oracle and base["tau"] > 0:
        settings["oracle_headroom"] = oracle[0]["tau"] / base["tau"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = dict(csv=write_csv(results, out / "results.csv"),
                 json=write_json(results, verdict_rows, settings, out / "results.json"),
                 png=plot_pareto(results, out / "pareto.png", tol=args.tol,
                                 title=f"τ vs accuracy — {paths['data'].name}, n={len(rows)}, γ={args.gamma}"))

    log("")
    log(format_table(results))
    log(f"\nlossless (reject_all): accuracy {100 * base['accuracy']:.1f}%, τ {base['tau']:.3f}"
        + (f"; oracle headroom {settings['oracle_headroom']:.2f}x" if "oracle_headroom" in settings else ""))
    if verdict_rows:
        for v in verdict_rows:
            log(v["text"])
    else:
        log("no judge evaluated: no verdicts")
    if calibration is not None and "threshold" in calibration:
        name = judge_rule(calibration["threshold"], calibration["min_run"]).name
        ours = next(r for r in results if r["name"] == name)
        where = (args.calibrate_fine or args.calibrate_on).name
        log(f"calibrated {name} (on {where}): held-out accuracy {100 * ours['accuracy']:.1f}%, "
            f"τ {ours['tau']:.3f} ({ours['tau'] / base['tau']:.2f}x lossless)")
    log(f"\nwrote {files['csv']}, {files['json']}, {files['png']}")
    return dict(rows=results, verdicts=verdict_rows, settings=settings, paths=files)


def _calibrate(args, data_path, draft, target, judge, tokenizer, eos, log) -> dict:
    from .calibrate import calibrate, reports, summary
    from .data import load_rows

    for flag, path in (("--calibrate-on", args.calibrate_on), ("--calibrate-fine", args.calibrate_fine)):
        if path is not None and path.resolve() == Path(data_path).resolve():
            raise ValueError(f"{flag} {path} is the evaluated --data: calibrate on validation data")
    fine_rows = load_rows(args.calibrate_fine) if args.calibrate_fine is not None else None
    pick, coarse, fine = calibrate(draft, target, judge, tokenizer, load_rows(args.calibrate_on), tol=args.tol,
                                   fine_rows=fine_rows, fine_tol=args.fine_tol, min_runs=args.min_runs,
                                   gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, eos_token_id=eos, progress=not args.no_progress,
                                   workers=args.workers, tau_floor=args.tau_floor)
    log(reports(pick, coarse, fine, args.tol, args.calibrate_on, args.calibrate_fine, fine_tol=args.fine_tol,
                tau_floor=args.tau_floor))
    return summary(pick, coarse, fine, args.tol, args.fine_tol, tau_floor=args.tau_floor)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"spd-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
