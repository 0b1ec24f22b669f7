"""``compt eval CKPT``: evaluate a checkpoint, run folder or export with its paradigm's evaluation.

CLIP: zero-shot top-1 and retrieval R@1/5/10 on the embedded sets and ImageFolders (paper §4, Table 2),
in percent. LM: validation loss (nats per token) and bits per byte on the run's validation split.
"""

from __future__ import annotations

import argparse
import json

# flag -> the evaluate_checkpoint keyword it sets (passed only when given)
_OPTIONS = {
    "imagefolder": "imagefolders",
    "no_embedded": "embedded",
    "seed": "seed",
    "num_images": "num_images",
    "data": "data",
    "num_windows": "num_windows",
    "batch_size": "batch_size",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (CLIP: zero-shot and retrieval; LM: validation loss, bits per byte)",
        description="Evaluate a checkpoint file, a run folder or an exported member. CLIP: the embedded eval "
        "sets (rendered at the checkpoint's image size) and ImageFolder sets, in percent. LM: validation "
        "loss and bits per byte on the run's own validation split (or --data).",
    )
    p.add_argument(
        "ckpt", metavar="CKPT", help="checkpoint file, run folder (final.pt / newest step_*.pt) or export"
    )
    p.add_argument(
        "--imagefolder",
        metavar="DIR",
        action="append",
        help="CLIP: an ImageFolder (one sub-folder per class) to add as a zero-shot task; repeatable",
    )
    p.add_argument(
        "--no-embedded", action="store_true", default=None, help="CLIP: skip the embedded eval sets"
    )
    p.add_argument("--batch-size", type=int, help="samples per forward (default CLIP 256, LM 16)")
    p.add_argument("--seed", type=int, help="CLIP: seed of the embedded eval sets (default 0)")
    p.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        help="CLIP: images per embedded task and retrieval images (default: 500 each)",
    )
    p.add_argument(
        "--data", metavar="DATA", help="LM: validation text (stdlib | TEXT_DIR); default: the run's own data"
    )
    p.add_argument(
        "--num-windows", type=int, metavar="N", help="LM: validation windows (default data.eval_windows)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compt.engine.checkpoint import CheckpointError
    from compt.lossless import CHANCE_PREFIX
    from compt.paradigms import paradigm_of_path

    options = {key: getattr(args, flag) for flag, key in _OPTIONS.items() if getattr(args, flag) is not None}
    if "embedded" in options:
        options["embedded"] = not options["embedded"]
    paradigm = paradigm_of_path(args.ckpt)
    try:
        metrics, info = paradigm.evaluate_checkpoint(args.ckpt, device=args.device, **options)
    except CheckpointError as e:  # a corrupt or foreign file is a user error: one line, exit 2
        raise ValueError(str(e)) from e
    if args.json:
        print(json.dumps({**info, "metrics": metrics}, indent=2))
        return 0
    print(f"{info['member'] or '?'} from {info['source']} ({info.get('setting', paradigm.name)})")
    shown = {k: v for k, v in metrics.items() if not k.startswith(CHANCE_PREFIX)}
    width = max(map(len, shown))
    for key, value in shown.items():
        fmt = "6.2f" if paradigm.higher_is_better(key) else "7.4f"  # percentages; losses
        chance = metrics.get(CHANCE_PREFIX + key)
        print(
            f"  {key:<{width}}  {value:{fmt}}" + (f"  (chance {chance:{fmt}})" if chance is not None else "")
        )
    return 0
