"""Evaluation (DESIGN.md §7): sweep the acceptance rules on a held-out set; tables and a Pareto plot.

Command: ``spd-eval`` / ``python -m spd_verl.eval`` (see ``__main__``). The pieces are importable::

    from spd_verl.eval import build_rules, evaluate, mark_pareto, verdicts, plot_pareto
    rows = evaluate(build_rules(), draft, target, judge, tokenizer, load_rows("test.parquet"), gamma=4)
"""

from .data import load_rows, prompt_ids
from .pareto import fronts, mark_pareto, pareto_front, verdicts
from .plot import plot_pareto
from .report import format_table, write_csv, write_json
from .sweep import COLUMNS, Rule, build_rules, evaluate, reference_rules

__all__ = ["evaluate", "build_rules", "reference_rules", "Rule", "COLUMNS", "load_rows", "prompt_ids",
           "pareto_front", "mark_pareto", "fronts", "verdicts", "plot_pareto", "format_table", "write_csv",
           "write_json"]
