"""``compt export CKPT OUT_DIR``: write a member in open_clip's ``local-dir:`` layout (issue part 6)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint as an open_clip local-dir folder",
        description="Write OUT_DIR/open_clip_config.json and OUT_DIR/open_clip_model.safetensors, loadable "
        "with open_clip.create_model_and_transforms('local-dir:OUT_DIR') and "
        "open_clip.get_tokenizer('local-dir:OUT_DIR').",
    )
    p.add_argument(
        "ckpt", metavar="CKPT", help="checkpoint file, run folder (final.pt / newest step_*.pt) or export"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if absent)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the export of another model (member, config or weights) already in OUT_DIR",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compt.engine.checkpoint import CheckpointError
    from compt.paradigms.clip.export import export_member

    try:
        out = export_member(args.ckpt, args.out_dir, force=args.force)
    except CheckpointError as e:  # a corrupt or foreign file is a user error: one line, exit 2
        raise ValueError(str(e)) from e
    print(f"exported {args.ckpt} -> {out}  (open_clip: 'local-dir:{out}')")
    return 0
