"""The Pareto plot: τ (x) vs accuracy (y), one curve per swept rule, single points for the rest."""

from __future__ import annotations

from pathlib import Path

from .pareto import pareto_front

CURVES = {  # family -> (colour, marker, legend label)
    "judge": ("tab:red", "o", "trained judge (threshold sweep)"),
    "target_prob": ("tab:blue", "s", "target prob ≥ eps (sweep)"),
    "typical": ("tab:green", "^", "typical acceptance (sweep)"),
}
POINTS = {  # family -> (colour, marker, size, legend label)
    "reject_all": ("black", "*", 260, "lossless SD (reject_all)"),
    "accept_all": ("dimgray", "X", 140, "accept_all"),
    "oracle": ("goldenrod", "D", 110, "single-swap oracle"),
    "hand_rule": ("tab:purple", "P", 140, "non-digit hand rule"),
}


def _draw(ax, rows, tol, annotate=True):
    known = set(CURVES) | set(POINTS)
    for fam, (colour, marker, label) in CURVES.items():
        members = [r for r in rows if r["rule"] == fam]
        if not members:
            continue
        ax.scatter([r["tau"] for r in members], [100 * r["accuracy"] for r in members], color=colour,
                   marker=marker, s=30, alpha=0.35, zorder=2, label=f"{label}: every setting")
        front = pareto_front(members)
        ax.plot([r["tau"] for r in front], [100 * r["accuracy"] for r in front], color=colour, marker=marker,
                markersize=6, linewidth=2, label=f"{label}: Pareto front", zorder=3)
        if fam == "judge" and annotate:  # threshold labels; coincident points share one label
            spots: dict[tuple, list] = {}
            for r in members:
                spots.setdefault((round(r["tau"], 6), round(r["accuracy"], 6)), []).append(r["setting"])
            for (tau, acc), settings in spots.items():
                ax.annotate(",".join(f"{t:g}" for t in settings), (tau, 100 * acc), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=colour)
    for fam, (colour, marker, size, label) in POINTS.items():
        members = [r for r in rows if r["rule"] == fam]
        if members:
            ax.scatter([r["tau"] for r in members], [100 * r["accuracy"] for r in members], color=colour,
                       marker=marker, s=size, edgecolors="white", linewidths=0.8, label=label, zorder=4)
    others = [r for r in rows if r["rule"] not in known]
    for fam in dict.fromkeys(r["rule"] for r in others):
        members = [r for r in others if r["rule"] == fam]
        ax.scatter([r["tau"] for r in members], [100 * r["accuracy"] for r in members], marker="o", s=50,
                   label=fam, zorder=4)
    lossless = [r for r in rows if r["rule"] == "reject_all"]
    if lossless:
        ax.axhline(100 * (lossless[0]["accuracy"] - tol), color="black", linestyle="--", linewidth=1, alpha=0.7,
                   label=f"lossless accuracy − {100 * tol:g} pt", zorder=1)
    ax.set_xlabel("τ  (emitted tokens per target forward)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)


def plot_pareto(rows: list[dict], path, tol: float = 0.01, title: str | None = None, zoom_points: float = 5.0) -> Path:
    """Write the τ/accuracy plot to ``path`` (PNG). Swept families: every setting as faint markers
    and the Pareto front as a solid line; judge points are labelled with their threshold. When
    some rule falls more than ``zoom_points`` below lossless accuracy, a second panel zooms on the
    band around lossless accuracy (where the verdicts are decided)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    lossless = [r for r in rows if r["rule"] == "reject_all"]
    lo = 100 * lossless[0]["accuracy"] - zoom_points if lossless else None
    zoom = lo is not None and any(100 * r["accuracy"] < lo for r in rows)
    fig = Figure(figsize=(13 if zoom else 8.5, 6.6), dpi=120)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    _draw(axes[0], rows, tol)
    axes[0].set_ylim(-3, 103)
    if zoom:
        _draw(axes[1], rows, tol)
        near = [r for r in rows if 100 * r["accuracy"] >= lo]
        top = max(100 * r["accuracy"] for r in near)
        axes[1].set_ylim(lo - 0.5, top + 0.1 * (top - lo) + 0.5)
        taus = [r["tau"] for r in near]
        pad = 0.05 * (max(taus) - min(taus)) + 0.05
        axes[1].set_xlim(min(taus) - pad, max(taus) + pad)
        axes[1].set_title(f"zoom: accuracy ≥ lossless − {zoom_points:g} pts", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, framealpha=0.9)
    if title:
        fig.suptitle(title)
    rows_of_legend = (len(labels) + 2) // 3
    fig.tight_layout(rect=(0, 0.035 * rows_of_legend + 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
