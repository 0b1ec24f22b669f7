"""Reports of finished runs: Table-2-style Markdown (:mod:`compt.report.tables`) and figures
(:mod:`compt.report.figures`), rendered from ``summary.json`` and ``metrics.jsonl`` alone."""

from compt.report.tables import (
    MAIN_METRICS,
    Run,
    load_run,
    member_curve,
    read_metrics,
    render_markdown,
    report_warnings,
    resolve_runs,
    write_report,
)

__all__ = [
    "Run",
    "load_run",
    "read_metrics",
    "member_curve",
    "render_markdown",
    "resolve_runs",
    "write_report",
    "report_warnings",
    "MAIN_METRICS",
]
