"""``compt chain run SPEC``: train a whole family as a chain (or, ``--individual``, its baseline twins).

Single process::

    compt chain run configs/demo.yaml --individual   # the baseline twins (for the lossless check)
    compt chain run configs/demo.yaml                # the chain; rerun the same command to resume

On GPUs, every rank runs the same command::

    torchrun --nproc_per_node 8 -m compt chain run configs/vit-cc3m.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
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
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    return load_spec(args.spec, overrides)


def _run(args) -> int:
    from compt.chain import run_chain
    from compt.engine import dist
    from compt.engine.train import NonFiniteLossError, TrainingInterrupted

    spec = _load(args)
    # One process group for the whole chain (train_member reuses it rather than making its own).
    info = dist.init_distributed(spec.train.get("device", "auto"))
    try:
        summary = run_chain(spec, individual=args.individual)
    except NonFiniteLossError as e:  # a message that says what to change, not a traceback
        print(f"compt chain: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"compt chain: {e}", file=sys.stderr)
        return 143
    finally:
        dist.teardown(info)
    if dist.is_main():
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
        print(f"report: compt report {spec.out_dir}")
    return 0


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
