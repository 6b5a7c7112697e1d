"""The training curve of a run: verl's file logger (``trainer.logger`` with ``file``) writes one JSON
record per step to ``$VERL_FILE_LOGGER_PATH``; spd-train points it at ``OUT/metrics.jsonl`` and
shows the SPD metrics from it as a table (and every metric as ``OUT/training_metrics.csv``).

    records = load_metrics("runs/demo/metrics.jsonl")     # [{"step": 0, "val-spd/tau": ..., ...}, ...]
    print(curve_table(records, every=10))
    write_metrics_csv(records, "runs/demo/training_metrics.csv")
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

CURVE = (  # (metric, header, format): what a person reads to see where the judge went
    ("spd/tau", "tau", "{:.3f}"),
    ("spd/accepted_mismatch_rate", "acc.mm", "{:.1%}"),
    ("spd/accuracy", "acc", "{:.1%}"),
    ("spd/response_length", "len", "{:.1f}"),
    ("spd/tokens_per_accept", "tok/acc", "{:.2f}"),
    ("val-spd/tau", "val tau", "{:.3f}"),
    ("val-spd/accuracy", "val acc", "{:.1%}"),
    ("perf/time_per_step", "s/step", "{:.1f}"),
)


def load_metrics(path) -> list[dict]:
    """One flat dict per step (``step`` plus every metric logged at it), by step; records of one
    step (e.g. validation logged apart from training) are merged."""
    steps: dict[int, dict] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, data = int(rec["step"]), rec["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {n}: not a verl file-logger record "
                             f'({{"step": N, "data": {{...}}}}): {e}') from None
        steps.setdefault(step, {"step": step}).update(data)
    return [steps[s] for s in sorted(steps)]


def curve_table(records: list[dict], every: int = 10) -> str:
    """Markdown table of :data:`CURVE` at step 1, every ``every``-th step and the last one
    (validation columns filled where validation ran); "" when no record holds a CURVE metric."""
    if every < 1:
        raise ValueError(f"curve_table: every must be >= 1, got {every}")
    cols = [c for c in CURVE if any(c[0] in r for r in records)]
    if not cols:
        return ""
    last = records[-1]["step"]
    rows = [r for r in records if r["step"] in (0, 1, last) or r["step"] % every == 0]
    lines = ["| step | " + " | ".join(h for _, h, _ in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in rows:
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "" for k, _, fmt in cols]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_metrics_csv(records: list[dict], path) -> Path:
    """Every numeric metric of every step as one CSV row (columns: step, then sorted names)."""
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *keys], extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    return path
