"""Pareto fronts in (τ ↑, accuracy ↑) and the judge-vs-baseline verdicts."""

from __future__ import annotations

BASELINE_ORDER = ("reject_all", "accept_all", "target_prob", "typical", "hand_rule", "oracle")
_EPS = 1e-12


def _xy(p) -> tuple[float, float]:
    if isinstance(p, dict):
        return float(p["tau"]), float(p["accuracy"])
    tau, acc = p
    return float(tau), float(acc)


def pareto_front(points):
    """The points no other point dominates in (τ ↑, accuracy ↑), sorted by τ ascending.

    A point dominates another when it is at least as good in both and better in one. ``points`` are
    (tau, accuracy) pairs or dicts with "tau" and "accuracy" (returned as given); of exact
    duplicates only the first is kept.
    """
    pts = list(points)
    xy = [_xy(p) for p in pts]
    front, seen = [], set()
    for i, (t, a) in enumerate(xy):
        dominated = any(t2 >= t and a2 >= a and (t2 > t or a2 > a) for j, (t2, a2) in enumerate(xy) if j != i)
        if not dominated and (t, a) not in seen:
            seen.add((t, a))
            front.append(i)
    front.sort(key=lambda i: (xy[i][0], -xy[i][1]))
    return [pts[i] for i in front]


def mark_pareto(rows: list[dict]) -> list[dict]:
    """Set ``row["pareto"]``: whether the row is on its own rule family's Pareto front."""
    for fam in dict.fromkeys(r["rule"] for r in rows):
        members = [r for r in rows if r["rule"] == fam]
        on = {id(r) for r in pareto_front(members)}
        for r in members:
            r["pareto"] = id(r) in on
    return rows


def fronts(rows: list[dict]) -> dict[str, list[dict]]:
    """Family -> its Pareto front (rows sorted by τ)."""
    return {fam: pareto_front([r for r in rows if r["rule"] == fam]) for fam in dict.fromkeys(r["rule"] for r in rows)}


def _points(tol: float) -> str:
    pts = tol * 100
    return f"{pts:g} point" + ("" if abs(pts - 1) < 1e-9 else "s")


def _fmt(tau) -> str:
    return "— (no setting meets the bar)" if tau is None else f"{tau:.3f}"


def lossless(rows: list[dict]) -> dict:
    for r in rows:
        if r["rule"] == "reject_all":
            return r
    raise ValueError("verdicts need a reject_all (lossless SD) row to set the accuracy bar")


def verdicts(rows: list[dict], tol: float = 0.01) -> list[dict]:
    """One verdict per baseline family present: the judge's best τ among its settings with
    accuracy ≥ lossless accuracy − tol, against the baseline's best τ under the same bar.

    Returns dicts with baseline, bar, judge_best_tau, baseline_best_tau (None when no setting meets
    the bar), outcome ("judge wins" / "judge loses" / "tie") and text. [] without judge rows.
    """
    judge_rows = [r for r in rows if r["rule"] == "judge"]
    if not judge_rows:
        return []
    lossless_row = lossless(rows)
    bar = lossless_row["accuracy"] - tol

    def best(fam_rows):
        ok = [r["tau"] for r in fam_rows if r["accuracy"] >= bar - _EPS]
        return max(ok) if ok else None

    x = best(judge_rows)
    families = [f for f in BASELINE_ORDER if any(r["rule"] == f for r in rows)]
    families += [f for f in dict.fromkeys(r["rule"] for r in rows) if f not in families and f != "judge"]
    out = []
    for fam in families:
        y = best([r for r in rows if r["rule"] == fam])
        if x is None and y is None:
            outcome = "tie"
        elif y is None:
            outcome = "judge wins"
        elif x is None:
            outcome = "judge loses"
        else:
            outcome = "tie" if abs(x - y) < 1e-9 else ("judge wins" if x > y else "judge loses")
        text = (f"at accuracy ≥ lossless − {_points(tol)}: judge best τ {_fmt(x)} vs {fam} best τ {_fmt(y)} "
                f"({outcome})")
        if fam == "oracle" and x is not None and y is not None and y > lossless_row["tau"]:
            share = (x - lossless_row["tau"]) / (y - lossless_row["tau"])
            text += f"; judge captures {100 * share:.0f}% of the oracle's τ gain over lossless"
        out.append(dict(baseline=fam, bar=bar, judge_best_tau=x, baseline_best_tau=y, outcome=outcome, text=text))
    return out
