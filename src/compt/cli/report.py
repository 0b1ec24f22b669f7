"""``compt report RUN [BASELINE_RUN]``: Table 2 and Figures 1/5/8 from a run's summary.json (paper §5)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render a run (and a baseline) as Table 2 + figures",
        description="Render RUN/summary.json (and BASELINE_RUN/summary.json) as report.md with PNG figures: "
        "metric vs cumulative training MACs, epochs per link, acceleration ratios. Reads only structured "
        "files (summary.json, metrics.jsonl).",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="run folder holding summary.json (or the file itself), or a "
        "`compt chain run` output folder (renders chain/ against individual/)",
    )
    p.add_argument(
        "baseline", metavar="BASELINE_RUN", nargs="?", help="baseline run folder (members trained alone)"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/report)")
    p.add_argument(
        "--metric",
        metavar="KEY",
        help="y axis of the cost figure (default: the run's headline metric, e.g. mean_zeroshot_top1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from compt.report import load_run, report_warnings, resolve_runs, write_report

    run_path, baseline = resolve_runs(args.run, args.baseline)
    out = args.out or (Path(args.run) / "report" if Path(args.run).is_dir() else None)
    run, base = load_run(run_path), (load_run(baseline) if baseline is not None else None)
    for warning in report_warnings(run, base):  # also at the top of report.md
        print(f"compt report: warning: {warning}", file=sys.stderr)
    report = write_report(run, base, out, metric=args.metric)
    print(f"report: {report} (figures: {', '.join(sorted(p.name for p in report.parent.glob('*.png')))})")
    return 0
