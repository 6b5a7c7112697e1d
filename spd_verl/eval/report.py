"""Writing the results: results.csv, results.json, and the compact stdout table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .sweep import COLUMNS

TABLE = (  # (column, header, format)
    ("name", "rule", "{}"),
    ("accuracy", "acc%", "{:.1f}"),
    ("tau", "tau", "{:.3f}"),
    ("accepted_mismatch_rate", "acc.mm%", "{:.1f}"),
    ("mismatches_per_seq", "mm/seq", "{:.2f}"),
    ("mean_response_length", "len", "{:.1f}"),
    ("target_forwards_per_token", "tf/tok", "{:.3f}"),
    ("wall_time_s", "wall_s", "{:.2f}"),
    ("pareto", "front", "{}"),
)
_PERCENT = {"accuracy", "accepted_mismatch_rate"}


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_csv(rows: list[dict], path) -> Path:
    # Scalar columns only (kept outputs, if any, go to the JSON).
    extra = [k for k in rows[0] if k not in COLUMNS and not isinstance(rows[0][k], (list, dict))] if rows else []
    cols = list(COLUMNS) + extra
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return path


def write_json(rows: list[dict], verdicts: list[dict], settings: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_json_safe(dict(settings=settings, rows=rows, verdicts=verdicts)), indent=2,
                               ensure_ascii=False) + "\n")
    return path


def format_table(rows: list[dict]) -> str:
    cells = [[h for _, h, _ in TABLE]]
    for r in rows:
        line = []
        for key, _, fmt in TABLE:
            v = r.get(key)
            if key in _PERCENT and v is not None:
                v = 100 * v
            if key == "pareto":
                v = "*" if v else ""
            line.append("" if v is None else fmt.format(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    out = []
    for k, c in enumerate(cells):
        out.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
