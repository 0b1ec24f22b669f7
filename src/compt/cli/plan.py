"""``compt plan``: the training MACs of a family, individually vs as a chain (paper Table 2, App. C.2).

    compt plan --family vit --members ViT-T/16,ViT-S/16,ViT-B/16,ViT-L/16 \\
        --samples 2753427 --baseline-epochs 128 --epochs 128,24,18,15 --captions 4
    compt plan --family tiny --json
    compt plan configs/demo.yaml                 # a chain spec: its family, members, epochs, data, batch
    compt plan --family vit --members ViT-T/16,ViT-S/16,ViT-B/16,ViT-L/16 --epochs 128,24,18,15 \
        --progressive all                        # AutoProg-One on every chain member (an estimate)
    compt plan --family llama --samples 4882812 --baseline-epochs 1 --seq-len 2048   # 10B tokens

Models are built on the meta device, so planning ViT-L takes seconds and no memory.
"""

from __future__ import annotations

import argparse
import json

from compt.cost import PAPER_BATCH_SIZE
from compt.engine.progressive import ProgressiveConfig
from compt.families import Member, get_family, get_member
from compt.plan import DEFAULT_END_FRACTION, DEFAULT_TARGET_RATIO, ChainPlan, plan_chain

CC3M_SAMPLES = 2_753_427  # valid CC3M images (paper Table A)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="training MACs of a model family: baseline vs chain (Table 2)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec", nargs="?", metavar="SPEC", help="a chain spec YAML: plan exactly the chain it trains"
    )
    p.add_argument("--family", help="registered family (vit, swin, tiny, debug) or a family YAML file")
    p.add_argument(
        "--members",
        help="comma-separated members, smallest first (ViT-S/16 or ViT-S-16); "
        "default: every member of --family",
    )
    p.add_argument(
        "--samples",
        type=int,
        help=f"samples per epoch: images (CLIP) or windows of --seq-len tokens (LM) "
        f"(default {CC3M_SAMPLES:,}, CC3M as in the paper)",
    )
    p.add_argument(
        "--baseline-epochs",
        type=float,
        help="epochs of individual (baseline) training for every member (default 128, CC3M)",
    )
    p.add_argument(
        "--epochs",
        help="comma-separated chain epochs, one per member, fractions allowed (e.g. 3,1,0.75); "
        "default: allocated per §3.1.2",
    )
    p.add_argument("--captions", type=int, help="CLIP: captions per image, M (default 4, Table G)")
    p.add_argument("--seq-len", type=int, help="LM: tokens per sample (default: the member's context length)")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"global batch size: optimizer steps = round(epochs x (samples // batch)) "
        f"(default {PAPER_BATCH_SIZE}, Table C)",
    )
    p.add_argument(
        "--target-ratio",
        type=float,
        default=DEFAULT_TARGET_RATIO,
        help="accumulated acceleration aimed at when allocating epochs "
        f"(default {DEFAULT_TARGET_RATIO}, Table 2)",
    )
    p.add_argument(
        "--end-fraction",
        type=float,
        default=DEFAULT_END_FRACTION,
        help=f"last member's epochs / second member's when allocating (default {DEFAULT_END_FRACTION})",
    )
    p.add_argument(
        "--progressive",
        choices=list(_PROGRESSIVE),
        help="chain members trained with AutoProg-One's searched schedule (default none; a spec says "
        "it per member in train/link.progressive): first, links or all",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _members(args: argparse.Namespace) -> list[Member]:
    if args.members:
        names = [n.strip() for n in args.members.split(",") if n.strip()]
        if args.family:
            family = get_family(args.family)
            return [family.member(n) for n in names]
        return [get_member(n) for n in names]
    if args.family:
        return list(get_family(args.family).members)
    raise ValueError("say which models to plan: --family NAME (all its members) and/or --members A,B,...")


def _epochs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(e) if "." in e or "e" in e.lower() else int(e) for e in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--epochs must be comma-separated numbers, e.g. 128,24,18,15 or 3,1,0.75; got {text!r}"
        ) from None


# flag -> the keyword of Paradigm.sample_cost it sets
_SAMPLE_FLAGS = {"captions": "num_captions", "seq_len": "seq_len"}


def _sample(args: argparse.Namespace, members: list[Member]) -> dict[str, int]:
    """The per-sample keywords of the flags given; a flag of another paradigm is an error."""
    paradigm = members[0].paradigm
    sample = {}
    for flag, key in _SAMPLE_FLAGS.items():
        if getattr(args, flag) is None:
            continue
        if key not in paradigm.sample_fields:
            raise ValueError(
                f"--{flag.replace('_', '-')} does not apply to {paradigm.name} members ({members[0].name}); "
                f"their samples take: {', '.join(paradigm.sample_fields) or 'nothing'}"
            )
        sample[key] = getattr(args, flag)
    return sample


# The flags a chain spec answers itself (`compt plan SPEC`), with their defaults otherwise.
_SPEC_FLAGS = {
    "family": None,
    "members": None,
    "samples": CC3M_SAMPLES,
    "baseline_epochs": 128,
    "epochs": None,
    "captions": None,  # none given: the paradigm's sample (CLIP: 4 captions)
    "seq_len": None,
    "batch_size": PAPER_BATCH_SIZE,
    "progressive": "none",
}
# --progressive: which chain members train with AutoProg-One (member index -> bool).
_PROGRESSIVE = {
    "none": lambda i: False,
    "first": lambda i: i == 0,
    "links": lambda i: i > 0,
    "all": lambda i: True,
}


def run(args: argparse.Namespace) -> int:
    if args.spec:
        members, plan = _plan_spec(args)
    else:
        for flag, default in _SPEC_FLAGS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, default)
        members = _members(args)
        plan = plan_chain(
            members,
            samples=args.samples,
            baseline_epochs=args.baseline_epochs,
            epochs=_epochs(args.epochs),
            sample=_sample(args, members),
            batch_size=args.batch_size,
            target_ratio=args.target_ratio,
            end_fraction=args.end_fraction,
            progressive=[
                ProgressiveConfig() if _PROGRESSIVE[args.progressive](i) else None
                for i in range(len(members))
            ],  # fmt: skip
        )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, members[0].paradigm.describe_sample(plan.sample)))
    return 0


def _plan_spec(args: argparse.Namespace) -> tuple[list[Member], ChainPlan]:
    """The plan of the chain a spec trains: its members, epochs, data size, captions and batch."""
    from compt.chain import load_spec, member_train_config

    given = [f"--{k.replace('_', '-')}" for k in _SPEC_FLAGS if getattr(args, k) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)}: with SPEC these come from the spec; edit it or drop the flag(s)"
        )
    spec = load_spec(args.spec)
    members = spec.resolved_members()
    configs = [member_train_config(spec, i, individual=False) for i in range(len(members))]
    batches = {c.global_batch_size for c in configs}
    if len(batches) > 1:
        raise ValueError(
            f"{args.spec}: compt plan counts one global batch size; this spec's links use another "
            f"({sorted(batches)}); plan it with --family, --members and --batch-size"
        )
    paradigm = members[0].paradigm
    samples = paradigm.num_samples(spec.data, members[0])
    if samples is None:
        raise ValueError(
            f"{args.spec}: the size of its data is known only by loading it; plan with --samples"
        )
    plan = plan_chain(
        members,
        samples=samples,
        baseline_epochs=spec.baseline_epochs,
        epochs=list(spec.epochs) or None,  # none given: allocated as `compt chain run` allocates them
        sample=paradigm.cost_sample(spec.data),
        batch_size=batches.pop(),
        target_ratio=spec.target_ratio or args.target_ratio,
        end_fraction=args.end_fraction,
        progressive=[c.progressive for c in configs],
    )
    return members, plan


def _unit(value: float, units: list[tuple[float, str]]) -> tuple[float, str]:
    for scale, label in units:
        if value >= scale:
            return scale, label
    return units[-1]


_PER_SAMPLE_UNITS = [(1e9, "G"), (1e6, "M"), (1e3, "K"), (1.0, "")]
# Table 2 reports run MACs in 10^10 G; smaller runs get a readable prefix instead.
_RUN_UNITS = [(1e19, "1e10 G"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1.0, "")]


def format_plan(plan: ChainPlan, sample: str) -> str:
    """The plan as a text table shaped like the cost columns of the paper's Table 2."""
    rows = plan.rows
    fs, fu = _unit(max(r.train_macs for r in rows), _PER_SAMPLE_UNITS)
    rs, ru = _unit(plan.baseline_total_macs, _RUN_UNITS)
    header = [
        "model",
        "params (M)",
        "w/o tok. emb. (M)",
        f"fwd/sample ({fu})",
        f"train/sample ({fu})",
        "epochs",
        f"baseline indiv. ({ru})",
        f"baseline accum. ({ru})",
        f"chain indiv. ({ru})",
        f"chain accum. ({ru})",
    ]
    marks = {"search": " AP*", "manual": " AP"}  # AutoProg members
    table = [header]
    for r in rows:
        table.append(
            [
                r.name,
                f"{r.params['total'] / 1e6:.2f}",
                f"{r.params.get('total_no_embed', r.params['total']) / 1e6:.2f}",
                f"{r.forward_macs / fs:.2f}",
                f"{r.train_macs / fs:.2f}",
                f"{r.epochs:g}",
                f"{r.baseline_macs / rs:.2f}",
                f"{r.baseline_accumulated_macs / rs:.2f}",
                f"{r.chain_macs / rs:.2f} ({r.individual_acceleration:.2f}x){marks.get(r.progressive, '')}",
                f"{r.chain_accumulated_macs / rs:.2f} ({r.accumulated_acceleration:.2f}x)",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        f"samples/epoch {plan.samples:,}, {sample} per sample, "
        f"baseline {plan.baseline_epochs:g} epochs, batch {plan.batch_size}",
    ]
    if plan.allocated:
        lines.append(
            "epochs allocated per §3.1.2: first member at the baseline epochs, the rest decreasing "
            f"linearly in log(params) to {plan.end_fraction:g}x the second's, aimed at "
            f"{plan.target_ratio:g}x accumulated acceleration (pass --epochs to choose them)"
        )
    lines.append("")
    for j, row in enumerate(table):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    estimate = " (an estimate: see AP* above)" if plan.estimate else ""
    lines.append(
        f"total: baseline {plan.baseline_total_macs / rs:.2f} {ru} MACs, "
        f"chain {plan.chain_total_macs / rs:.2f} {ru} MACs, acceleration {plan.acceleration:.2f}x{estimate}"
    )
    if any(r.progressive for r in rows):
        lines.append(
            "AP: the chain run trains with AutoProg-One (its stages' MACs, search phases and scoring "
            "included); the baseline columns are individual training without it."
        )
    if plan.estimate:
        lines.append(
            "AP*: an ESTIMATE, since a searched schedule is known only once it ran: each search is assumed "
            "to choose the linear ramp (depth and resolution growing one growth-space step per stage). "
            "The run's own train_macs are exact."
        )
    return "\n".join(lines)
