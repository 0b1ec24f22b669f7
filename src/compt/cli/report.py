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
    p.add_argument("run", metavar="RUN", help="run folder holding summary.json (or the file itself)")
    p.add_argument("baseline", metavar="BASELINE_RUN", nargs="?", help="baseline run folder (members trained alone)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/report)")
    p.add_argument("--metric", metavar="KEY", help="y axis of the cost figure (default: mean_zeroshot_top1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compt.report import write_report

    report = write_report(args.run, args.baseline, args.out, metric=args.metric)
    print(report)
    return 0
