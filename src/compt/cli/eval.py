"""``compt eval CKPT``: zero-shot top-1 and retrieval R@1/5/10 of any checkpoint (paper §4, Table 2)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot classification and retrieval of a checkpoint",
        description="Evaluate a checkpoint file, a run folder or an exported member on the embedded eval "
        "sets (rendered at the checkpoint's image size) and on ImageFolder sets. Metrics are percentages.",
    )
    p.add_argument(
        "ckpt", metavar="CKPT", help="checkpoint file, run folder (final.pt / newest step_*.pt) or export"
    )
    p.add_argument(
        "--imagefolder",
        metavar="DIR",
        action="append",
        default=[],
        help="an ImageFolder (one sub-folder per class) to add as a zero-shot task; repeatable",
    )
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded eval sets")
    p.add_argument("--batch-size", type=int, default=256, help="images/texts per forward (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded eval sets (default 0)")
    p.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        help="images per embedded task and retrieval images (default: 500 each)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compt.engine.checkpoint import CheckpointError
    from compt.paradigms.clip.evaluate import CHANCE_PREFIX, evaluate_checkpoint

    try:
        metrics, info = evaluate_checkpoint(
            args.ckpt,
            imagefolders=args.imagefolder,
            embedded=not args.no_embedded,
            seed=args.seed,
            num_images=args.num_images,
            batch_size=args.batch_size,
            device=args.device,
        )
    except CheckpointError as e:  # a corrupt or foreign file is a user error: one line, exit 2
        raise ValueError(str(e)) from e
    if args.json:
        print(json.dumps({**info, "metrics": metrics}, indent=2))
        return 0
    size = f"{info['image_size']} px, context {info['context_length']}"
    print(f"{info['member'] or '?'} from {info['source']} ({size})")
    shown = {k: v for k, v in metrics.items() if not k.startswith(CHANCE_PREFIX)}
    width = max(map(len, shown))
    for key, value in shown.items():
        chance = metrics.get(CHANCE_PREFIX + key)
        print(f"  {key:<{width}}  {value:6.2f}" + (f"  (chance {chance:6.2f})" if chance is not None else ""))
    return 0
