"""spd-train: the demo's main command — GRPO training of the judge through verl's own
``python -m verl.trainer.main_ppo`` (nothing else drives training), then a held-out evaluation of
lossless SD (reject_all) against the trained judge at its configured threshold and at the threshold
chosen on held-in data (spd_verl.eval.calibrate): a coarse grid on the validation split, then, when
a ``calib.parquet`` sits beside it (the demo world ships 1,600 problems), a fine window there.

    spd-train                                   # demo world, configs/spd_demo.yaml, CPU
    spd-train trainer.total_training_steps=20   # any Hydra override goes to main_ppo
    spd-train --config-name spd_gsm8k ...       # another config in configs/

Equivalent plain verl command (what this runs):

    VERL_PLATFORM=cpu python -m verl.trainer.main_ppo --config-path $PWD/configs \
        --config-name spd_demo trainer.default_local_dir=runs/demo/checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CALIBRATION_TOL = 0.01  # the target's bar: accuracy within 1 point of lossless


def main_ppo_command(config_name: str, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR),
            "--config-name", config_name, f"trainer.default_local_dir={out / 'checkpoints'}", *overrides]


def judge_exports(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, judge dir) of every ``global_step_N/judge`` export under ``checkpoints``, by step."""
    steps = sorted((int(m.group(1)), p / "judge") for p in Path(checkpoints).glob("global_step_*")
                   if (m := re.fullmatch(r"global_step_(\d+)", p.name)) and (p / "judge" / "config.json").exists())
    if not steps:
        raise FileNotFoundError(f"no judge export under {checkpoints}/global_step_*/judge: did training save a "
                                f"checkpoint (trainer.save_freq)?")
    return steps


def latest_judge(checkpoints: Path) -> Path:
    return judge_exports(checkpoints)[-1][1]


def compose(config_name: str, overrides: list[str]):
    if not (CONFIG_DIR / f"{config_name}.yaml").exists():
        raise FileNotFoundError(f"no config {config_name}.yaml in {CONFIG_DIR} (spd-train runs from a source "
                                f"checkout of spd_verl; or call verl.trainer.main_ppo with --config-path yourself)")
    import spd_verl.verl_ext.register  # noqa: F401  (config resolvers)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _val_file(cfg) -> Path:
    files = cfg.data.val_files
    files = [files] if isinstance(files, str) else list(files)
    if len(files) != 1:
        raise ValueError(f"calibration reads one validation parquet; data.val_files has {len(files)}: "
                         f"pass --calibration-file")
    return Path(files[0])


def eval_gamma(cfg) -> int:
    """γ of the held-out evaluation and its calibration: ``spd.eval.num_speculative_tokens``, or
    the rollout's when that is null. A judge scores one mismatch from its context, so it can be
    trained at one γ and deployed at another (README: Results, sessions 10–12)."""
    from omegaconf import OmegaConf

    from spd_verl.verl_ext.config import check_int_at_least_1

    gamma = OmegaConf.select(cfg, "spd.eval.num_speculative_tokens", default=None)
    if gamma is None:
        return cfg.actor_rollout_ref.rollout.num_speculative_tokens
    check_int_at_least_1(gamma, "spd.eval.num_speculative_tokens", nullable=True)
    return gamma


def eval_min_runs(cfg, gamma: int) -> list[int]:
    """Run gates (spd.RunGated) the calibration chooses among, with the threshold:
    ``spd.eval.min_runs``, or the rollout's ``min_accept_run`` alone when that is null."""
    from omegaconf import ListConfig, OmegaConf

    from spd_verl.verl_ext.config import check_min_run

    runs = OmegaConf.select(cfg, "spd.eval.min_runs", default=None)
    if runs is None:
        return [rollout_min_run(cfg)]
    if not isinstance(runs, (list, tuple, ListConfig)) or not len(runs):
        raise ValueError(f"spd.eval.min_runs must be a non-empty list of run gates (1 = none), got {runs!r}")
    for m in runs:
        check_min_run(m, "spd.eval.min_runs", gamma)
    return list(runs)


def eval_fine_tol(cfg) -> float:
    """Accuracy tolerance of the calibration's pick on the calib split: ``spd.eval.fine_tol``, or
    the target's 1 point when null. Smaller is a safety margin for the held-out bar."""
    from omegaconf import OmegaConf

    tol = OmegaConf.select(cfg, "spd.eval.fine_tol", default=None)
    if tol is None:
        return CALIBRATION_TOL
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol <= CALIBRATION_TOL:
        raise ValueError(f"spd.eval.fine_tol must be a number in [0, {CALIBRATION_TOL:g}] (a margin inside the "
                         f"target's bar of {CALIBRATION_TOL:g}), got {tol!r}")
    return float(tol)


def eval_tau_floor(cfg) -> float | None:
    """``spd.eval.tau_floor``: deploy each judge at the most accurate setting with τ ≥ that many times
    lossless τ on the calib split, rather than at the most τ (null). Needs the calib split."""
    from omegaconf import OmegaConf

    from spd_verl.eval.calibrate import check_tau_floor

    floor = OmegaConf.select(cfg, "spd.eval.tau_floor", default=None)
    try:
        check_tau_floor(floor)
    except ValueError as e:
        raise ValueError(f"spd.eval.{e}") from None
    return None if floor is None else float(floor)


def eval_proxy_more(cfg) -> int:
    """``spd.eval.proxy_more`` (null = 0): with ``spd.eval.tau_floor``, while no calibrated judge
    reaches the floor at the bar, calibrate the swap proxy's next-ranked judge, up to this many more."""
    from omegaconf import OmegaConf

    more = OmegaConf.select(cfg, "spd.eval.proxy_more", default=None)
    if more is None:
        return 0
    if isinstance(more, bool) or not isinstance(more, int) or more < 0:
        raise ValueError(f"spd.eval.proxy_more must be an integer >= 0 or null, got {more!r}")
    return more


def eval_batch_size(cfg) -> int:
    """Prompts per generate call of the held-out evaluation and its calibration:
    ``spd.eval.batch_size``, or spd-eval's 32 when null. On a CPU the tiny demo models decode the
    1,600 calib problems 1.77x faster in batches of 400 than of 32, with the same results (README:
    Engine speed); on GPUs a batch is bounded by the target's KV cache."""
    from omegaconf import OmegaConf

    from spd_verl.verl_ext.config import check_int_at_least_1

    size = OmegaConf.select(cfg, "spd.eval.batch_size", default=None)
    check_int_at_least_1(size, "spd.eval.batch_size", nullable=True)
    return 32 if size is None else size


def eval_workers(cfg) -> int:
    """Decoding processes of the held-out evaluation, its calibration and the swap proxy's bank:
    ``spd.eval.workers`` (null = 1). On a 2-core CPU two forked workers with one thread each decode
    the tiny demo models ~1.3x faster than one process with two threads, with the same results
    (spd_verl.eval.parallel; README: Engine speed). CPU only."""
    from omegaconf import OmegaConf

    from spd_verl.eval.parallel import check_workers

    workers = OmegaConf.select(cfg, "spd.eval.workers", default=None)
    return 1 if workers is None else check_workers(workers, "spd.eval.workers")


def eval_judges(cfg, exports: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """The saved judges (``exports``: (step, dir) by step, from :func:`judge_exports`) whose
    calibrations compete for the held-out evaluation: ``spd.eval.steps``, a list of steps or
    ``all``; null = the last judge alone. The training step is then chosen with the threshold, on the
    same held-in data (README: Results, session 18)."""
    from omegaconf import ListConfig, OmegaConf

    steps = OmegaConf.select(cfg, "spd.eval.steps", default=None)
    if steps is None:
        return exports[-1:]
    if steps == "all":
        return list(exports)
    if (not isinstance(steps, (list, tuple, ListConfig)) or not len(steps)
            or any(isinstance(t, bool) or not isinstance(t, int) for t in steps)):
        raise ValueError(f"spd.eval.steps must be null, 'all' or a non-empty list of training steps, got {steps!r}")
    if not exports:  # checked before training: only the form can be
        return []
    saved = {step: path for step, path in exports}
    missing = sorted(set(steps) - set(saved))
    if missing:
        raise ValueError(f"spd.eval.steps {missing}: no judge export for those steps (saved: {sorted(saved)}); "
                         f"trainer.save_freq decides which steps are saved")
    return [(step, saved[step]) for step in sorted(set(steps))]


def eval_proxy(cfg) -> tuple[int | None, int, float]:
    """(keep, problems, budget) of the swap proxy's preselection (spd_verl.eval.swap_proxy):
    ``spd.eval.proxy_keep`` (null = calibrate every judge ``spd.eval.steps`` lists; k = only the k
    the proxy ranks highest), ``spd.eval.proxy_problems`` (the first N problems of the fine
    calibration file, else of the calibration file, make the bank) and ``spd.eval.proxy_budget``."""
    from omegaconf import OmegaConf

    from spd_verl.eval.swap_proxy import DEFAULT_BUDGET
    from spd_verl.verl_ext.config import check_int_at_least_1

    keep = OmegaConf.select(cfg, "spd.eval.proxy_keep", default=None)
    problems = OmegaConf.select(cfg, "spd.eval.proxy_problems", default=400)
    budget = OmegaConf.select(cfg, "spd.eval.proxy_budget", default=DEFAULT_BUDGET)
    check_int_at_least_1(keep, "spd.eval.proxy_keep", nullable=True)
    check_int_at_least_1(problems, "spd.eval.proxy_problems")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"spd.eval.proxy_budget must be a number in (0, 1] (harmful swaps per bank problem), "
                         f"got {budget!r}")
    return keep, problems, float(budget)


def proxy_preselect(judges: list[tuple[int, Path]], draft, target, tokenizer, rows: list[dict], kw: dict,
                    keep: int, budget: float) -> tuple[list[tuple[int, Path]], list[dict], list[tuple[int, Path]]]:
    """The ``keep`` judges of ``judges`` ((step, dir), in step order) that the swap proxy ranks
    highest (ties: the later), in their order, every judge's score (a record for the JSON), and the
    other judges, best-ranked first (``spd.eval.proxy_more`` draws on them)."""
    from spd_verl.eval.data import load_eval_judge
    from spd_verl.eval.swap_proxy import build_swap_bank, judge_logits, swap_score

    t0 = time.time()
    bank = build_swap_bank(draft, target, tokenizer, rows, kw["gamma"], kw["max_new_tokens"], kw["eos_token_id"],
                           batch_size=kw["batch_size"], workers=kw["workers"])
    print(f"swap proxy: {len(bank)} mismatches of lossless SD on {bank.n_problems} problems, "
          f"{int(bank.harmful.sum())} of whose single swaps lose the answer ({time.time() - t0:.0f} s)", flush=True)
    scores = []
    for step, path in judges:
        score = swap_score(judge_logits(load_eval_judge(path, target), bank), bank, budget)
        scores.append(dict(step=step, judge=str(path), score=score))
    ranked = sorted(range(len(judges)), key=lambda i: (scores[i]["score"], i), reverse=True)
    top = ranked[:keep]
    print("| judge | swap proxy | calibrated |\n| --- | --- | --- |\n" + "\n".join(
        f"| {_judge_label(path)} | {r['score']:.3f} | {'yes' if i in top else ''} |"
        for i, ((_, path), r) in enumerate(zip(judges, scores))), flush=True)
    return [judges[i] for i in sorted(top)], scores, [judges[i] for i in ranked[keep:]]


def rollout_min_run(cfg) -> int:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, "actor_rollout_ref.rollout.min_accept_run", default=1)


def fine_calibration_file(calibration_file: Path | None, test_file: Path) -> Path | None:
    """``calib.parquet`` beside the calibration file, when there is one (and it is not the test set)."""
    if calibration_file is None:
        return None
    sibling = calibration_file.parent / "calib.parquet"
    if not sibling.exists() or sibling.resolve() in (calibration_file.resolve(), test_file.resolve()):
        return None
    return sibling


def held_out_eval(cfg, judge_dir: Path, test_file: Path, limit: int | None,
                  calibration_file: Path | None = None, fine_file: Path | None = None,
                  out_json: Path | None = None, earlier: list[tuple[int, Path]] = ()) -> list[dict]:
    """reject_all and the judge at ``rollout.score_threshold`` (behind ``rollout.min_accept_run``) on
    the held-out set; with a ``calibration_file``, also the judge at the threshold and run gate
    chosen there (in a fine window on ``fine_file`` after the coarse grid, when given).
    ``earlier``: (step, dir) of other saved judges calibrated the same way; the one whose pick has
    the most τ on the calibration set (ties: the later) is the one evaluated at its pick. With
    ``spd.eval.proxy_keep`` = k, only the k of them (the last judge included) that the swap proxy
    ranks highest are calibrated (:func:`proxy_preselect`, on the first ``spd.eval.proxy_problems``
    of the fine calibration file, else of the calibration file). With ``spd.eval.tau_floor`` each judge
    is deployed at its speed-up floor (:func:`spd_verl.eval.calibrate.calibrate`) but they still compare
    by their most-τ picks, and while none reaches the floor at the bar, up to ``spd.eval.proxy_more``
    more judges are calibrated in the proxy's order.
    ``out_json``: every table printed, as JSON, with each phase's wall time (``eval_seconds``)."""
    from spd_verl.eval.calibrate import calibrate, pick_threshold, reports
    from spd_verl.eval.data import eos_token_id, load_causal_lm, load_eval_judge, load_rows, load_tokenizer
    from spd_verl.eval.pareto import lossless
    from spd_verl.eval.report import format_table
    from spd_verl.eval.sweep import Rule, evaluate, judge_rule
    from spd_verl.spd import RejectAll

    ro = cfg.actor_rollout_ref.rollout
    gamma = eval_gamma(cfg)
    min_runs = eval_min_runs(cfg, gamma)
    draft = load_causal_lm(ro.draft_model_path, "draft")
    target = load_causal_lm(ro.target_model_path, "target")
    tokenizer = load_tokenizer(ro.target_model_path)
    judge = last = load_eval_judge(judge_dir, target)
    kw = dict(gamma=gamma, max_new_tokens=cfg.data.max_response_length, batch_size=eval_batch_size(cfg),
              workers=eval_workers(cfg),
              eos_token_id=eos_token_id(tokenizer, target))
    settings = [(ro.score_threshold, rollout_min_run(cfg))]
    pick = None
    record = {"judge": str(judge_dir), "test_file": str(test_file), "gamma": gamma, "min_runs": min_runs,
              "calibration_file": None}
    seconds, t0 = {}, time.time()  # the demo's time budget: which phase takes it
    if calibration_file is not None:
        for path in (calibration_file, fine_file):
            if path is not None and path.resolve() == Path(test_file).resolve():
                raise ValueError(f"calibration file {path} is the held-out test file: calibrate on held-in data")
        fine_rows = load_rows(fine_file) if fine_file is not None else None
        calib_rows = load_rows(calibration_file)
        fine_tol = eval_fine_tol(cfg)
        tau_floor = eval_tau_floor(cfg)
        if tau_floor is not None and fine_rows is None:
            raise ValueError("spd.eval.tau_floor chooses on the calib split: no calib.parquet beside "
                             f"{calibration_file}")
        judges = [*earlier, (_step_of(judge_dir), judge_dir)]
        keep, proxy_problems, budget = eval_proxy(cfg)
        reserve = []
        if keep is not None and len(judges) > keep:
            judges, record["swap_proxy"], reserve = proxy_preselect(
                judges, draft, target, tokenizer, (fine_rows or calib_rows)[:proxy_problems], kw, keep, budget)
            seconds["swap_proxy"], t0 = time.time() - t0, time.time()
        reserve = reserve[:eval_proxy_more(cfg)] if tau_floor is not None else []
        earlier = [j for j in judges if j[1] != judge_dir]  # calibrated besides the last judge (or instead)
        candidates, chosen, queue = [], None, list(judges)
        while queue:
            _, path = queue.pop(0)
            candidate = last if path == judge_dir else load_eval_judge(path, target)
            if earlier or candidates:
                print(f"calibrating the judge {path}", flush=True)
            pick, coarse, fine = calibrate(draft, target, candidate, tokenizer, calib_rows, tol=CALIBRATION_TOL,
                                           fine_rows=fine_rows, fine_tol=fine_tol, min_runs=min_runs,
                                           tau_floor=tau_floor, **kw)
            print(reports(pick, coarse, fine, CALIBRATION_TOL, calibration_file, fine_file, fine_tol=fine_tol,
                          tau_floor=tau_floor))
            # The judges compare by their most-τ picks (with a floor too: how far a judge's curve reaches at
            # the bar is its strength), on the same set (the fine one when there is one); ties go to the
            # later judge. Only the leading judge stays loaded.
            fastest = pick if tau_floor is None else pick_threshold(fine, fine_tol)
            candidates.append(dict(judge=str(path), pick=pick, fastest=fastest, coarse=coarse, fine=fine))
            if chosen is None or _pick_tau(fastest) >= _pick_tau(chosen["fastest"]):
                chosen, judge = candidates[-1], candidate
            floor = None if tau_floor is None else tau_floor * lossless(fine or coarse)["tau"]
            if not queue and reserve and _pick_tau(chosen["fastest"]) < floor:
                # No judge calibrated so far reaches the floor at the bar: the proxy's next one may
                # (README: Evaluation, the speed-up floor; session 25 measured it on five weak runs).
                queue.append(reserve.pop(0))
                print(f"no judge so far reaches τ {floor:.3f} ({tau_floor:g}x lossless) at the bar: "
                      f"calibrating the proxy's next judge, {_judge_label(queue[0][1])}", flush=True)
        pick = chosen["pick"]
        several = any(c["judge"] != str(judge_dir) for c in candidates)  # not the last judge alone
        if several:
            print(f"chosen judge: {_judge_label(chosen['judge'])}" + ("" if pick is None else
                  f" at {pick['name']} (τ {pick['tau']:.3f} on the calibration set)"), flush=True)
        record.update(judge=chosen["judge"], last_judge=str(judge_dir),
                      calibration_file=str(calibration_file), fine_calibration_file=str(fine_file) if fine_file else None,
                      fine_tol=fine_tol, tau_floor=tau_floor, calibration_pick=pick,
                      calibration_coarse=chosen["coarse"],
                      calibration_fine=chosen["fine"])
        if several:
            record["candidates"] = [{k: c[k] for k in ("judge", "pick", "coarse", "fine")} for c in candidates]
        seconds["calibration"], t0 = time.time() - t0, time.time()
    test_rows = load_rows(test_file, limit)
    rules = [Rule.fixed("reject_all", RejectAll())] + [judge_rule(t, m) for t, m in settings]
    rows = evaluate(rules, draft, target, last, tokenizer, test_rows, **kw)
    if pick is not None and (judge is not last or (pick["setting"], pick["min_run"]) != settings[0]):
        rows += evaluate([judge_rule(pick["setting"], pick["min_run"])], draft, target, judge, tokenizer, test_rows,
                         **kw)
    print(format_table(rows))
    base = rows[0]
    parts = [f"reject_all acc {base['accuracy']:.1%} tau {base['tau']:.3f}"]
    for i, r in enumerate(rows[1:]):
        which = "" if judge is last else f"{_judge_label(record['judge'])}, "
        tag = f" ({which}chosen on {(fine_file or calibration_file).name})" if i else ""
        parts.append(f"{r['name']}{tag} acc {r['accuracy']:.1%} tau {r['tau']:.3f} ({r['tau'] / base['tau']:.2f}x lossless)")
    print(f"held-out ({base['n']} problems, γ {gamma}): " + " | ".join(parts))
    seconds["held_out"] = time.time() - t0
    print("evaluation wall time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in seconds.items()),
          flush=True)
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps({**record, "held_out": rows, "eval_seconds": seconds}, indent=1,
                                             default=str))
        print(f"wrote {out_json}")
    return rows


def _pick_tau(pick: dict | None) -> float:
    return -1.0 if pick is None else pick["tau"]


def _step_of(path) -> int | None:
    """global_step_30/judge -> 30; None for any other directory."""
    m = re.fullmatch(r"global_step_(\d+)", Path(path).parent.name)
    return int(m.group(1)) if m else None


def _judge_label(path) -> str:
    """global_step_30/judge -> "global_step_30's judge"; any other directory by its name."""
    path = Path(path)
    return f"{path.parent.name}'s judge" if path.name == "judge" else path.name


def with_file_logger(cfg, overrides: list[str]) -> list[str]:
    """``overrides`` plus verl's ``file`` logger in ``trainer.logger`` (kept: the config's and the
    user's loggers), so that every run of spd-train records its metrics for the training curve."""
    loggers = cfg.trainer.logger
    loggers = [loggers] if isinstance(loggers, str) else list(loggers)
    if "file" in loggers:
        return list(overrides)
    kept = [o for o in overrides if not o.lstrip("+~").startswith("trainer.logger=")]
    return [*kept, f"trainer.logger=[{','.join([*loggers, 'file'])}]"]


def show_training_curve(metrics_file: Path, csv_file: Path, since: float = 0.0) -> None:
    """The SPD metrics every 10 steps as a table, and every metric as CSV, from verl's file logger;
    nothing when the config's ``trainer.logger`` has no ``file`` (no file written after ``since``,
    so an earlier run's file in the same directory is not shown as this one's)."""
    from spd_verl.eval.training_log import curve_table, load_metrics, write_metrics_csv

    if not metrics_file.exists() or metrics_file.stat().st_mtime < since:
        return
    records = load_metrics(metrics_file)
    table = curve_table(records)
    if table:
        print(f"training curve ({metrics_file}):\n{table}")
    print(f"wrote {write_metrics_csv(records, csv_file)}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spd-train", description=__doc__.split("\n\n")[0],
                                 epilog="Unrecognised arguments are Hydra overrides for main_ppo.")
    ap.add_argument("--config-name", default="spd_demo")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="checkpoints and eval outputs")
    ap.add_argument("--test-file", type=Path, help="held-out parquet (default: the demo world's test split)")
    ap.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out problems only")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--calibration-file", type=Path,
                    help="parquet on which to choose the judge's threshold (default: the config's data.val_files)")
    ap.add_argument("--fine-calibration-file", type=Path,
                    help="larger parquet for the fine stage of the threshold choice (default: calib.parquet beside "
                         "the calibration file, if there is one)")
    ap.add_argument("--no-calibration", action="store_true", help="evaluate at rollout.score_threshold only")
    args, overrides = ap.parse_known_args(argv)
    out = args.out.resolve()
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("VERL_PLATFORM", "cpu")  # spd_verl's CPU platform for verl
    cfg = compose(args.config_name, overrides)
    if not args.no_eval:
        eval_min_runs(cfg, eval_gamma(cfg))  # a bad eval setting fails now, not after training
        eval_fine_tol(cfg)
        eval_tau_floor(cfg)
        eval_proxy_more(cfg)
        eval_batch_size(cfg)
        eval_workers(cfg)
        eval_judges(cfg, [])
        eval_proxy(cfg)
    cmd = main_ppo_command(args.config_name, out, with_file_logger(cfg, overrides))
    metrics_file = Path(env.setdefault("VERL_FILE_LOGGER_PATH", str(out / "metrics.jsonl")))  # verl's file logger
    metrics_file.parent.mkdir(parents=True, exist_ok=True)  # verl opens the file without making its directory
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, env=env)
    print(f"main_ppo finished rc={rc} in {time.time() - t0:.0f} s", flush=True)
    show_training_curve(metrics_file, out / "training_metrics.csv", since=t0)
    if rc != 0 or args.no_eval:
        return rc
    judges = eval_judges(cfg, judge_exports(out / "checkpoints"))
    judge_dir = judges[-1][1]
    test_file = args.test_file
    if test_file is None:
        from spd_verl.world import WORLD_DIR

        test_file = WORLD_DIR / "data" / "test.parquet"
    print(f"held-out evaluation of {', '.join(str(p) for _, p in judges)} on {test_file}", flush=True)
    calibration_file = None if args.no_calibration else (args.calibration_file or _val_file(cfg))
    fine_file = None if args.no_calibration else (args.fine_calibration_file or
                                                  fine_calibration_file(calibration_file, test_file))
    held_out_eval(cfg, judge_dir, test_file, args.eval_limit, calibration_file, fine_file,
                  out_json=out / "held_out_eval.json", earlier=judges[:-1] if calibration_file else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
