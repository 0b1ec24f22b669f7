"""Reports of finished runs: Table-2-style Markdown (:mod:`compt.report.tables`), the Fig. 1 curves
(:mod:`compt.report.curves`) and the other figures (:mod:`compt.report.figures`), rendered from
``summary.json`` and ``metrics.jsonl`` alone; runs and their seeds are loaded by :mod:`compt.report.runs`."""

from compt.report.curves import SeedCurve, member_curve, seed_curves
from compt.report.runs import Run, collect_runs, load_run, pool_seeds, read_metrics
from compt.report.tables import (
    MAIN_METRICS,
    render_markdown,
    report_warnings,
    verdict_sentence,
    write_report,
)

__all__ = [
    "Run",
    "load_run",
    "read_metrics",
    "pool_seeds",
    "collect_runs",
    "member_curve",
    "seed_curves",
    "SeedCurve",
    "render_markdown",
    "write_report",
    "report_warnings",
    "verdict_sentence",
    "MAIN_METRICS",
]
