"""``compt report RUN... [--baseline RUN...]``: Table 2 and Figures 1/5/8 from summary.json files (§5)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render a run (and a baseline) as Table 2 + figures",
        description="Render RUN/summary.json (and its baseline's) as report.md with PNG figures: metric vs "
        "cumulative training MACs (seed bands), epochs per link, acceleration ratios. Several runs of one "
        "kind are seeds of one experiment, pooled (means ± seed std). Reads only structured files "
        "(summary.json, metrics.jsonl).",
    )
    p.add_argument(
        "runs",
        metavar="RUN",
        nargs="+",
        help="a run folder holding summary.json (or the file itself), a `compt chain run` output folder "
        "(renders chain/ against individual/), or a folder of those, one per seed. Runs of another kind "
        "than the first (e.g. `compt report CHAIN INDIVIDUAL`) are the baseline",
    )
    p.add_argument(
        "--baseline",
        metavar="RUN",
        nargs="+",
        default=(),
        help="the baseline run folder(s) (members trained alone), one per seed",
    )
    p.add_argument(
        "--out", metavar="DIR", help="output folder (default: RUN/report, or the seeds' common folder)"
    )
    p.add_argument(
        "--metric",
        metavar="KEY",
        help="y axis of the cost figure (default: the run's headline metric, e.g. mean_zeroshot_top1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from compt.report import collect_runs, report_warnings, verdict_sentence, write_report

    run, base = collect_runs(args.runs, args.baseline)
    single = len(args.runs) == 1 and Path(args.runs[0]).is_dir()
    out = args.out or (Path(args.runs[0]) / "report" if single else None)
    for warning in report_warnings(run, base):  # also at the top of report.md
        print(f"compt report: warning: {warning}", file=sys.stderr)
    report = write_report(run, base, out, metric=args.metric)
    sentence = verdict_sentence(run, base)
    if sentence:  # the one line a user of `make demo` reads (issue 12)
        print(sentence)
    print(f"report: {report} (figures: {', '.join(sorted(p.name for p in report.parent.glob('*.png')))})")
    return 0
