"""Choose the judge's operating threshold on a calibration set (validation data, never the test set).

A judge trained with sampled decisions has no built-in operating point: 0.5 is where its sampled
policy is indifferent, not where accuracy holds. The deployable threshold is the one with the
most τ whose accuracy stays within ``tol`` of lossless SD *on held-in data*; the held-out set then
measures that one threshold.

    grid = COARSE_GRID                                    # 0.005 ... 0.99
    rows = evaluate(judge rules at grid (x min_runs) + reject_all, ..., calibration rows)
    pick = pick_threshold(rows, tol=0.01)                 # None if no threshold keeps accuracy
    finer = refine_grid(rows, pick)                       # a second pass between pick and the next lower setting

or, with a larger calibration set (``fine_rows``; the demo world's calib split, 1,600 problems):

    window = fine_window(rows, pick)                      # 5 thresholds, grid step below the pick to the one above
    pick = pick_threshold(evaluate(reject_all + judge at window, ..., fine_rows))
    # none keeps the bar there: the grid's thresholds above the window, one at a time, until one does
    # tau_floor r: climb above that pick towards τ = r × lossless, deploy the most accurate setting at ≥ r

With ``min_runs`` (e.g. (1, 5, 6)) the coarse grid is swept once per run gate (spd.RunGated; 1 = no
gate), the fine stage sweeps each gate's window around that gate's own coarse pick, and the pick is
the best (threshold, min_run) pair there: which gate wins is decided on the larger set too (on 150
val problems one answer decides it).

150 validation problems move 0.67 points per answer, about as much as the 1-point bar allows, so a
pick made on them alone is noisy; the fine stage makes it on 1,600 more (400 until session 18;
README, Results, for how much the pick still moves between problem sets).

Thresholds run in ascending order, and once one accepts no mismatch on the whole set, the higher ones
are not decoded: every decision on that set then scored at most that threshold, so a higher one
rejects the same decisions on the same (lossless) trajectories and its row is the same, measured
(marked ``reused_from``). A judge whose P(accept) stays below 0.5 skips half the grid this way.

Nor are the thresholds above the first one that keeps the bar (per run gate and stage): a higher
threshold accepts fewer mismatches and gives less τ, so the first passing threshold is that gate's
pick. Replayed on the calibrations recorded in docs/results (sessions 9-22), this gives the same
pick in all 57 fine stages (at the 0.5- and the 1-point bar alike) and the same fine windows in all
164 coarse sweeps of one gate, and skips 46% of the fine stages' decodes and 47% of the coarse
ones (README: Results, session 23).
"""

from __future__ import annotations

from .pareto import lossless

# A gate's pick sits below a *cliff* when the next lower threshold of its fine window accepted more
# than CLIFF_GAP more of the mismatches (accepted-mismatch rate): the judge's scores crowd into a
# band narrower than the window's step, and the crossing lies somewhere inside it. The fine stage then
# bisects the step until the gap is at most CLIFF_RESOLUTION (or ``cliff_steps`` decodes are spent).
# Session 24's first demo judge accepted 52% of the calib mismatches at 0.8375 and 4% at 0.875.
# Of the 73 picks recorded since session 5 none had a gap above 0.23, so the rule leaves them alone.
CLIFF_GAP = 0.25
CLIFF_RESOLUTION = 0.1

# Dense at both ends (a logit-like spacing): a conservative judge's safe settings can all sit below
# 0.02 (session 19: run J1 lost 0.25 points at 0.02 behind the run gate 3, the old grid's floor).
COARSE_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def _min_run(row: dict) -> int:
    return row.get("min_run", 1)


def _judge_rows(rows: list[dict], min_run: int | None = None) -> list[dict]:
    """The judge rows (of one run gate, when ``min_run`` is given), by ascending threshold."""
    return sorted((r for r in rows if r["rule"] == "judge" and min_run in (None, _min_run(r))),
                  key=lambda r: (_min_run(r), r["setting"]))


def _gate_rows(rows: list[dict], min_run: int) -> list[dict]:
    """``rows`` without the judge rows of other run gates."""
    return [r for r in rows if r["rule"] != "judge" or _min_run(r) == min_run]


def pick_threshold(rows: list[dict], tol: float = 0.01, tau_floor: float | None = None) -> dict | None:
    """The judge row with the highest τ among those with accuracy ≥ lossless accuracy − tol
    (ties: the higher, more conservative threshold, then the longer run gate), or None when no
    judge row qualifies.

    ``tau_floor`` r: among those rows, the ones with τ ≥ r × lossless τ compete on accuracy instead
    (ties: the most τ): a deployment that wants a speed-up of r spends what the judge has beyond it
    on accuracy. None reaches the floor: the most τ, as without one.

    rows: sweep result rows (spd_verl.eval.evaluate) with one ``reject_all`` row and ≥ 1 ``judge`` row.
    """
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"calibration tol must be in [0, 1), got {tol!r}")
    check_tau_floor(tau_floor)
    judges = _judge_rows(rows)
    if not judges:
        raise ValueError("calibration needs judge rows (judge@<threshold>) to choose from")
    base = lossless(rows)
    passing = [r for r in judges if r["accuracy"] >= base["accuracy"] - tol - 1e-12]
    if not passing:
        return None
    fast = [] if tau_floor is None else [r for r in passing if r["tau"] >= tau_floor * base["tau"] - 1e-12]
    if fast:
        return max(fast, key=lambda r: (r["accuracy"], r["tau"], r["setting"], _min_run(r)))
    return max(passing, key=lambda r: (r["tau"], r["setting"], _min_run(r)))


def check_tau_floor(tau_floor) -> None:
    if tau_floor is not None and (isinstance(tau_floor, bool) or not isinstance(tau_floor, (int, float))
                                  or not tau_floor > 1.0):
        raise ValueError(f"tau_floor is a speed-up over lossless SD and must be a number > 1 (or None), "
                         f"got {tau_floor!r}")


def refine_grid(rows: list[dict], pick: dict | None, points: int = 4) -> list[float]:
    """``points`` thresholds strictly between the picked threshold and the next lower one on the grid
    (the side with more accepts, which failed or gave less τ): where a finer step may add τ.
    [] when nothing was picked or the pick is the lowest setting."""
    if pick is None:
        return []
    lower = [r["setting"] for r in _judge_rows(rows, _min_run(pick)) if r["setting"] < pick["setting"]]
    if not lower:
        return []
    lo, hi = max(lower), pick["setting"]
    return [round(lo + (hi - lo) * k / (points + 1), 6) for k in range(1, points + 1)]


def cliff(rows: list[dict], gate: int, bar: float) -> tuple[dict, dict] | None:
    """(highest failing row, lowest passing row) of run gate ``gate`` around its first threshold whose
    accuracy is ≥ ``bar``, or None when no threshold passes or none below it was decoded."""
    judges = _judge_rows(rows, gate)
    first = next((i for i, r in enumerate(judges) if r["accuracy"] >= bar - 1e-12), None)
    if not first:  # None, or the lowest threshold already passes
        return None
    return judges[first - 1], judges[first]


def summary(pick: dict | None, coarse: list[dict], fine: list[dict], tol: float, fine_tol: float | None = None,
            tau_floor: float | None = None) -> dict:
    """What was chosen where, from a :func:`calibrate` result: the set the pick was made on (the
    fine one when there is one), plus the coarse stage's own pick when there were two stages, and
    with a ``tau_floor`` the most-τ pick the floor replaced (``fastest``)."""
    rows = fine or coarse
    base = lossless(rows)
    pick_tol = tol if not fine or fine_tol is None else fine_tol
    out = dict(n=base["n"], tol=pick_tol, lossless_accuracy=base["accuracy"], lossless_tau=base["tau"],
               thresholds=[r["setting"] for r in _judge_rows(rows)],
               min_runs=sorted({_min_run(r) for r in _judge_rows(rows)}))
    if fine:
        coarse_pick = pick_threshold(coarse, tol)
        out["coarse"] = dict(n=lossless(coarse)["n"], thresholds=[r["setting"] for r in _judge_rows(coarse)],
                             min_runs=sorted({_min_run(r) for r in _judge_rows(coarse)}),
                             threshold=None if coarse_pick is None else coarse_pick["setting"],
                             min_run=None if coarse_pick is None else _min_run(coarse_pick))
    if pick is not None:
        out.update(threshold=pick["setting"], min_run=_min_run(pick), accuracy=pick["accuracy"], tau=pick["tau"])
    if tau_floor is not None:
        fastest = pick_threshold(rows, pick_tol)
        out.update(tau_floor=tau_floor, fastest=None if fastest is None else dict(
            threshold=fastest["setting"], min_run=_min_run(fastest), accuracy=fastest["accuracy"], tau=fastest["tau"]))
    return out


def report(pick: dict | None, rows: list[dict], tol: float, source, stage: str = "calibration",
           tau_floor: float | None = None) -> str:
    """The calibration sweep as a table plus the pick (what spd-eval and spd-train print);
    ``stage``: "calibration" for the final pick, "coarse stage" before a fine one."""
    from .report import format_table

    line = (f"{stage}: no judge threshold kept accuracy within {tol:g} of lossless" if pick is None
            else f"{stage}: threshold {pick['setting']:g}{_gate(pick)} (accuracy {100 * pick['accuracy']:.1f}%, "
                 f"τ {pick['tau']:.3f})")
    fastest = pick_threshold(rows, tol) if tau_floor is not None and pick is not None else None
    if fastest is not None:
        floor = tau_floor * lossless(rows)["tau"]
        reached = pick["tau"] >= floor - 1e-12
        line += (f": the most accurate with τ ≥ {tau_floor:g}x lossless ({floor:.3f})" if reached
                 else f": none reaches τ ≥ {tau_floor:g}x lossless ({floor:.3f}), so the most τ")
        if fastest is not pick:
            line += f"; the most τ: {fastest['name']} ({100 * fastest['accuracy']:.1f}%, τ {fastest['tau']:.3f})"
    reused_rows = [r for r in _judge_rows(rows) if r.get("reused_from")]
    if reused_rows:
        line = (f"not decoded: {', '.join(r['name'] for r in reused_rows)} (= {reused_rows[0]['reused_from']}, which "
                f"accepted no mismatch: a higher threshold decodes the same lossless trajectories)\n{line}")
    return f"{stage} on {source} ({lossless(rows)['n']} rows):\n{format_table(rows)}\n{line}"


def _gate(row: dict) -> str:
    return f", run >= {_min_run(row)}" if _min_run(row) > 1 else ""


def reports(pick: dict | None, coarse: list[dict], fine: list[dict], tol: float, source, fine_source=None,
            fine_tol: float | None = None, tau_floor: float | None = None) -> str:
    """:func:`report` of a :func:`calibrate` result: the coarse table, then the fine one if any."""
    if not fine:
        return report(pick, coarse, tol, source)
    return "\n".join([report(pick_threshold(coarse, tol), coarse, tol, source, stage="coarse stage"),
                      report(pick, fine, tol if fine_tol is None else fine_tol, fine_source, stage="calibration",
                             tau_floor=tau_floor)])


def fine_window(rows: list[dict], pick: dict | None, points: int = 5, min_run: int | None = None,
                grid=None) -> list[float]:
    """``points`` evenly spaced thresholds from the coarse grid step below the pick to the one above
    (both included): where the fine stage looks, since a small coarse set can miss the crossing by
    a grid step either way. The window is centred on the *lowest* threshold with the pick's τ (a
    judge that accepts nothing from 0.6 up ties lossless everywhere there; the pick reports 0.99,
    the crossing is just below 0.6). No pick (nothing kept accuracy): the top grid step.

    rows: the coarse sweep. Only one run gate's rows are read: the pick's, else ``min_run``, else the
    smallest swept. ``grid``: the coarse thresholds, decoded or not (default: that gate's swept
    settings; the sweep stops at the first threshold that keeps the bar, so the step above the
    pick is often not among them)."""
    if points < 2:
        raise ValueError(f"fine calibration needs at least 2 points, got {points}")
    gate = (_min_run(pick) if pick is not None else min_run if min_run is not None
            else min((_min_run(r) for r in _judge_rows(rows)), default=1))
    swept = [r["setting"] for r in _judge_rows(rows, gate)]
    if not swept:
        raise ValueError("fine_window needs the coarse sweep's judge rows")
    grid = sorted(set(swept) | set(grid or ()))
    if pick is None:
        lo, hi = grid[-2] if len(grid) > 1 else grid[-1], grid[-1]
    else:
        centre = min(r["setting"] for r in _judge_rows(rows, gate)
                     if r["tau"] == pick["tau"] and r["accuracy"] >= pick["accuracy"] - 1e-12)
        lo = max([t for t in grid if t < centre], default=centre)
        hi = min([t for t in grid if t > centre], default=centre)
    if lo == hi:
        return [lo]
    return [round(lo + (hi - lo) * k / (points - 1), 6) for k in range(points)]


def calibrate(draft, target, judge, tokenizer, rows: list[dict], *, tol: float = 0.01, grid=COARSE_GRID,
              refine_points: int = 4, fine_rows: list[dict] | None = None, fine_points: int = 5,
              fine_tol: float | None = None, min_runs=(1,), stop_at_bar: bool = True, cliff_steps: int = 4,
              tau_floor: float | None = None, climb_steps: int = 4,
              **eval_kwargs) -> tuple[dict | None, list[dict], list[dict]]:
    """Sweep reject_all and the judge at ``grid`` (behind each run gate of ``min_runs``; 1 = none)
    on the calibration ``rows`` and pick the (threshold, min_run) pair.

    Without ``fine_rows``: refine once between the pick and the next lower threshold, on ``rows``.
    With ``fine_rows`` (a larger calibration set): sweep reject_all and, per gate, :func:`fine_window`
    around that gate's coarse pick on them instead, and pick there; if no threshold of any window
    keeps the bar, the ``grid`` thresholds above the overall coarse pick's window (at its gate; no
    pick: ``min_runs[0]``) are added one at a time until one does (or the grid ends). The
    refinement without ``fine_rows`` stays at the coarse pick's gate.

    ``fine_tol`` (default ``tol``): the bar of the pick on ``fine_rows``. A tighter one than the
    target's ``tol`` is a safety margin: the best of ~20 settings picked right at the bar sits past
    it on fresh problems (made on 1,600 calibration problems, eight of nine such picks lost 1.05-1.7
    points on 2,000 fresh ones; at 0.005 all nine lost 0.15-0.75; README: Results, sessions 17-18).
    The coarse stage keeps ``tol``: it only places the windows.

    ``stop_at_bar``: per gate and stage, decode no threshold above the first that keeps the bar
    (module docstring); False decodes every one, for the whole accuracy/τ curve.

    ``cliff_steps``: in the fine stage, at most this many bisections per gate of a window step across
    which the accepted-mismatch rate falls by more than CLIFF_GAP (:func:`cliff`; 0 = never).

    ``tau_floor`` r (needs ``fine_rows``): deploy for a speed-up of r over lossless SD rather than
    the most τ. After the fine stage, at the gate of the most-τ pick, thresholds above it are decoded
    (the next window or grid threshold up while τ stays ≥ r × lossless τ, then bisecting the step
    where it fell below; at most ``climb_steps`` decodes), and the pick is the most accurate setting
    that keeps the bar with τ ≥ that floor (:func:`pick_threshold`; none: the most-τ pick). The
    most-τ pick is where the half-point margin is spent on τ; this spends a judge's τ beyond the
    floor on accuracy instead, chosen by τ, which 1,600 problems measure far more finely than
    accuracy (README: Evaluation, the speed-up floor).

    Returns (picked row or None, coarse rows incl. any refinement, fine rows or []).
    ``eval_kwargs`` go to :func:`spd_verl.eval.sweep.evaluate` (gamma, max_new_tokens, ...)."""
    from spd_verl.spd import RejectAll

    from .sweep import Rule, evaluate, judge_rule

    fine_tol = tol if fine_tol is None else fine_tol
    if not 0.0 <= fine_tol <= tol:
        raise ValueError(f"fine_tol must be in [0, tol={tol:g}] (a margin inside the target's bar), got {fine_tol!r}")
    min_runs = list(min_runs)
    if not min_runs or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in min_runs):
        raise ValueError(f"min_runs must be integers >= 1 (1 = no run gate), got {min_runs!r}")
    for name, steps in (("cliff_steps", cliff_steps), ("climb_steps", climb_steps)):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0 = none), got {steps!r}")
    check_tau_floor(tau_floor)
    if tau_floor is not None and fine_rows is None:
        raise ValueError("tau_floor needs fine_rows: the climb above the pick runs on the larger calibration set")

    def run(thresholds, data, results, gate, bar_tol, baseline=False, stop=True):
        """Append reject_all (``baseline``) and the judge at ascending ``thresholds`` behind run gate
        ``gate`` on ``data``, reusing the row of the lowest threshold that accepted nothing for every
        higher one, and stopping after the first that keeps accuracy within ``bar_tol`` of lossless
        (a higher one gives less τ; module docstring)."""
        if baseline:
            results += evaluate([Rule.fixed("reject_all", RejectAll())], draft, target, judge, tokenizer, data,
                                **eval_kwargs)
        bar = lossless(results)["accuracy"] - bar_tol - 1e-12
        silent = next((r for r in _judge_rows(results, gate) if r["accepted_mismatches"] == 0), None)
        for t in sorted(thresholds):
            if silent is not None and t >= silent["setting"]:
                results.append(reused(silent, t))  # free, and keeps pick_threshold's tie-break
                continue
            below = (r for r in _judge_rows(results, gate) if r["setting"] < t)
            if stop and stop_at_bar and any(r["accuracy"] >= bar for r in below):
                break
            row = evaluate([judge_rule(t, gate)], draft, target, judge, tokenizer, data, **eval_kwargs)[0]
            results.append(row)
            if row["accepted_mismatches"] == 0:
                silent = row
        return results

    def bisect_cliff(gate):
        """Bisect the window step around ``gate``'s crossing on ``fine_rows`` while it spans a cliff."""
        gap = CLIFF_GAP
        for _ in range(cliff_steps):
            pair = cliff(fine, gate, lossless(fine)["accuracy"] - fine_tol)
            if pair is None or pair[0]["accepted_mismatch_rate"] - pair[1]["accepted_mismatch_rate"] <= gap:
                return
            gap = CLIFF_RESOLUTION
            run([round((pair[0]["setting"] + pair[1]["setting"]) / 2, 6)], fine_rows, fine, gate, fine_tol)

    def climb(gate, ladder):
        """Decode ``gate``'s thresholds above its fastest passing one towards τ = tau_floor × lossless."""
        base = lossless(fine)
        floor, bar = tau_floor * base["tau"] - 1e-12, base["accuracy"] - fine_tol - 1e-12
        for _ in range(climb_steps):
            judges = _judge_rows(fine, gate)
            fast = [r for r in judges if r["tau"] >= floor and r["accuracy"] >= bar]
            if not fast:
                return
            hi = max(r["setting"] for r in fast)
            above = [r for r in judges if r["setting"] > hi]
            if above:  # the next one up is slower than the floor (or misses the bar): bisect the step
                nxt = min(above, key=lambda r: r["setting"])
                if nxt["tau"] >= floor:
                    return  # fast enough but under the bar above a passing one: noise, not a step to refine
                t = round((hi + nxt["setting"]) / 2, 6)
            else:
                t = min((t for t in ladder if t > hi), default=None)
                if t is None:
                    return
            run([t], fine_rows, fine, gate, fine_tol, stop=False)

    coarse = []
    for i, m in enumerate(min_runs):
        run(grid, rows, coarse, m, tol, baseline=i == 0)
    pick = pick_threshold(coarse, tol)
    gate = min_runs[0] if pick is None else _min_run(pick)
    if fine_rows is not None:
        fine, windows = [], {}
        for m in min_runs:
            own = pick_threshold(_gate_rows(coarse, m), tol)
            if own is None and m != gate:
                continue  # no threshold kept the bar behind this gate on the coarse set
            # Only around the gate's own coarse pick: a threshold val rejected is not tried again on
            # the larger set, where the best of more candidates would be picked at a luckier draw
            # (README: Results, session 13, measured a walk down the grid this way).
            windows[m] = fine_window(coarse, own, fine_points, m, grid)
            run(windows[m], fine_rows, fine, m, fine_tol, baseline=not fine)
            bisect_cliff(m)
        # Nothing in the window keeps the bar on the larger set: a saturated judge's coarse pick can
        # sit on a plateau below a cliff (run Q, README session 10). Walk up the coarse grid there and
        # take the first threshold that keeps it; one that accepts nothing always does (lossless).
        top = max(r["setting"] for r in _judge_rows(fine, gate))
        for t in (t for t in sorted(grid) if t > top):
            if pick_threshold(fine, fine_tol) is not None:
                break
            run([t], fine_rows, fine, gate, fine_tol)
        fastest = pick_threshold(fine, fine_tol)
        if tau_floor is not None and fastest is not None:
            g = _min_run(fastest)
            climb(g, sorted(set(grid) | set(windows.get(g, ()))))
        return pick_threshold(fine, fine_tol, tau_floor), coarse, fine
    finer = [t for t in refine_grid(coarse, pick, refine_points) if t not in set(grid)]
    if finer:
        run(finer, rows, coarse, gate, tol)
        pick = pick_threshold(coarse, tol)
    return pick, coarse, []


def reused(row: dict, threshold: float) -> dict:
    """``row`` (a judge threshold that accepted nothing) as the row of a higher ``threshold``."""
    if threshold < row["setting"] or row["accepted_mismatches"]:
        raise ValueError(f"judge@{row['setting']:g} accepted {row['accepted_mismatches']} mismatches; its row "
                         f"stands only for higher thresholds of a judge that accepted none (got {threshold:g})")
    from .sweep import judge_rule

    return {**row, "setting": threshold, "name": judge_rule(threshold, _min_run(row)).name, "wall_time_s": 0.0,
            "reused_from": row["name"]}
