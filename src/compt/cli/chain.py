"""``compt chain run SPEC``: train a whole family as a chain (or, ``--individual``, its baseline twins).

Single process::

    compt chain run configs/demo.yaml --individual   # the baseline twins (for the lossless check)
    compt chain run configs/demo.yaml                # the chain; rerun the same command to resume

On GPUs, every rank runs the same command::

    torchrun --nproc_per_node 8 -m compt chain run my-vit-chain.yaml   # a spec of your own (docs/train.md)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chain", help="train a model family as a chain (resumable)")
    chain_sub = p.add_subparsers(dest="chain_command", metavar="ACTION", required=True)
    run = chain_sub.add_parser(
        "run",
        help="train every member (finished ones are skipped, an interrupted one resumes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", help="chain spec YAML (see configs/)")
    run.add_argument("--individual", action="store_true", help="train every member from scratch instead")
    run.add_argument("--out", help="run folder (default: the spec's out_dir)")
    run.add_argument(
        "--retrain",
        action="store_true",
        help="retrain each member whose finished or started run has another config (moved to "
        "<member>.replaced-N, nothing deleted); default: refuse, naming what changed",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, dotted for nesting (e.g. --set train.lr=5e-4); repeatable",
    )
    run.set_defaults(func=_run)
    show = chain_sub.add_parser("show", help="print the resolved spec: members, epochs, per-member config")
    show.add_argument("spec")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_show)


def _load(args):
    from compt.chain import load_spec

    overrides = list(args.overrides)
    if getattr(args, "out", None):  # quoted: a path, never YAML (`--out 2024` or `--out yes` failed)
        overrides.append(f"out_dir={json.dumps(args.out)}")
    return load_spec(args.spec, overrides)


def _run(args) -> int:
    from compt.chain import run_chain
    from compt.cli.train import run_training
    from compt.engine import dist
    from compt.engine.runlog import setup_logging

    setup_logging()  # like `compt train`: progress and notes reach a batch job's log (issue 11)
    spec = _load(args)
    # One process group for the whole chain (train_member reuses it rather than making its own).
    info = dist.init_distributed(spec.train.get("device", "auto"))
    try:
        summary = run_training(
            "chain", lambda: run_chain(spec, individual=args.individual, retrain=args.retrain)
        )
    finally:
        dist.teardown(info)
    if isinstance(summary, int):
        return summary
    if dist.is_main():
        _print_summary(spec, summary, args)
    return 0


def _print_summary(spec, summary, args) -> None:
    kind = summary["kind"]
    root = Path(spec.out_dir) / kind
    print(f"\n{kind} run finished: {root}/summary.json")
    for m in summary["members"]:
        metric = m["metrics"].get(spec.eval.metric)
        shown = "n/a" if metric is None else f"{metric:.2f}"
        print(
            f"  {m['name']:<12} {spec.eval.metric}={shown}  train MACs {m['train_macs']:.3e}  "
            f"wall {m['wall_s']:.0f}s  export {root / m['export']}"
        )
    other = Path(spec.out_dir) / ("chain" if args.individual else "individual") / "summary.json"
    if other.is_file() or not args.individual:
        print(f"report: compt report {spec.out_dir}")
    else:  # issue 11: `compt report OUT` needs the chain; the baselines alone render as their own run
        print(f"report: compt report {root}   # the baselines alone")
        print(f"next:   compt chain run {args.spec}   # then compt report {spec.out_dir} compares the two")


def _show(args) -> int:
    from compt.chain import check_until_lossless, member_train_config
    from compt.config import ConfigError, to_dict

    spec = _load(args)
    epochs = spec.chain_epochs()
    members = spec.resolved_members()
    print(f"chain {spec.name}: family {spec.family}, out_dir {spec.out_dir}")
    size = members[0].paradigm.num_samples(spec.data, members[0])
    size_text = "unknown" if size is None else f"{size:,}"
    print(f"data ({size_text} samples per epoch): {json.dumps(to_dict(spec.data))}")
    for i, m in enumerate(members):
        cfg = to_dict(member_train_config(spec, i, individual=False))
        cfg.pop("data")
        print(f"  {i + 1}. {m.name}: chain epochs {epochs[i]:g} (individual {spec.baseline_epochs:g})")
        print("     " + json.dumps(cfg))
    if spec.until_lossless.enabled:
        try:
            check_until_lossless(spec)
            print("until_lossless: every link's individually trained twin has a result")
        except ConfigError as e:  # fine for `--individual`, which must run first
            print(f"until_lossless: not ready for the chain yet: {e}")
    return 0
