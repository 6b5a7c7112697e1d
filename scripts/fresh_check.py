"""Measure calibrated picks on fresh problems of the demo world, with less noise than the test split.

The 250 test problems move 0.4 points per answer, and the bar (lossless − 1 point) lets a rule lose
two answers net: a pick whose true loss is one point keeps it only about half the time. This draws
N problems like the world's splits, disjoint from every problem the models were trained on and
from val, test and calib, and evaluates each pick there (README: Results, session 17).

    python scripts/fresh_check.py runs/demo/held_out_eval.json RUN2/held_out_eval.json --n 2000
    python scripts/fresh_check.py recal.json --n 2000 --out fresh.json   # calibrate_checkpoints.py records

Each input is spd-train's ``held_out_eval.json`` or a ``calibrate_checkpoints.py --out`` record; its
picks are evaluated at the γ recorded there.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.spd import RejectAll
from spd_verl.world import build, load_world
from spd_verl.world.build import HOUSE_STYLES, TARGET, split_problems, to_rows, training_draw_size, write_parquet
from spd_verl.world.train import ModelSpec


@functools.lru_cache(maxsize=2)
def held_questions(world_seed: int = 0) -> frozenset:
    """Every question of the world's train (all of it, as the models' training drew it, not only the
    committed 20,000), val, test and calib lists."""
    tspec = ModelSpec(**{**TARGET, "steps": HOUSE_STYLES["target_steps"]})
    return frozenset(p.question for split in split_problems(world_seed, training_draw_size(tspec)) for p in split)


def fresh_problems(n: int, seed: int, world_seed: int = 0) -> list:
    """``n`` problems from generator ``seed``, none of whose questions is in :func:`held_questions`."""
    return build.fresh_problems(n, seed, held_questions(world_seed))


def fresh_rows(n: int, seed: int, world_seed: int = 0) -> list[dict]:
    """:func:`fresh_problems` as the evaluation's rows (written to a parquet and read back, as a split is)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet(to_rows(fresh_problems(n, seed, world_seed), "fresh"), Path(tmp) / "fresh.parquet")
        return load_rows(Path(tmp) / "fresh.parquet")


def picks(path: Path) -> list[dict]:
    """(name, judge dir, gamma, pick row, held-out row) of every pick recorded in ``path``."""
    rec = json.loads(path.read_text())
    if "calibration_pick" in rec:  # spd-train's held_out_eval.json
        held = next((r for r in reversed(rec["held_out"][1:]) if r["name"] == (rec["calibration_pick"] or {}).get("name")), None)
        entries = [(path.parent.name, rec["judge"], rec["calibration_pick"], held)]
        gamma = rec["gamma"]
    elif "checkpoints" in rec:  # calibrate_checkpoints.py --out
        entries = [(f"{path.stem} step {c['step']}", c["judge"], c["pick"], c.get("held_out"))
                   for c in rec["checkpoints"]]
        gamma = rec["gamma"]
    else:
        raise ValueError(f"{path}: neither spd-train's held_out_eval.json nor a calibrate_checkpoints.py record")
    missing = [name for name, _, pick, _ in entries if pick is None]
    if missing:
        raise ValueError(f"{path}: no calibrated pick for {missing} (no threshold kept the bar there)")
    return [dict(name=name, judge=judge, gamma=gamma, pick=pick, held_out=held) for name, judge, pick, held in entries]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path, nargs="+", help="held_out_eval.json or calibrate_checkpoints.py records")
    ap.add_argument("--n", type=int, default=2000, help="fresh problems to draw")
    ap.add_argument("--seed", type=int, default=424242, help="generator seed of the fresh problems")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=400,
                    help="prompts per generate call (spd.eval.batch_size; the results do not depend on it)")
    ap.add_argument("--workers", type=int, default=2,
                    help="decoding processes (forked, CPU only; spd.eval.workers; the results do not depend on it)")
    ap.add_argument("--out", type=Path, help="write every row here (JSON)")
    args = ap.parse_args(argv)
    entries = [e for path in args.records for e in picks(path)]
    world = load_world()
    rows = fresh_rows(args.n, args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, workers=args.workers,
              eos_token_id=world.eos_token_id, progress=False)
    lossless = {}
    print(f"| pick | calib | held-out (250) | fresh ({args.n}) | fresh loss, points |")
    print("| --- | --- | --- | --- | --- |")
    out = []
    for e in entries:
        g = e["gamma"]
        if g not in lossless:
            lossless[g] = evaluate([Rule.fixed("reject_all", RejectAll())], world.draft, world.target, None,
                                   world.tokenizer, rows, gamma=g, **kw)[0]
            print(f"| lossless, γ {g} | | | {100 * lossless[g]['accuracy']:.2f}% / {lossless[g]['tau']:.3f} | |")
        judge = load_eval_judge(e["judge"], world.target)
        p = e["pick"]
        fresh = evaluate([judge_rule(p["setting"], p.get("min_run", 1))], world.draft, world.target, judge,
                         world.tokenizer, rows, gamma=g, **kw)[0]
        base = lossless[g]
        held = e["held_out"]
        held_txt = "—" if held is None else f"{100 * held['accuracy']:.1f}% / {held['tau']:.3f}"
        print(f"| {e['name']}: {p['name']}, γ {g} | {100 * p['accuracy']:.2f}% / {p['tau']:.3f} | {held_txt} | "
              f"{100 * fresh['accuracy']:.2f}% / {fresh['tau']:.3f} ({fresh['tau'] / base['tau']:.2f}×) | "
              f"{100 * (base['accuracy'] - fresh['accuracy']):.2f} |", flush=True)
        out.append(dict(**e, fresh=fresh, fresh_lossless=base))
    if args.out is not None:
        args.out.write_text(json.dumps(dict(n=args.n, seed=args.seed, rows=out), indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
