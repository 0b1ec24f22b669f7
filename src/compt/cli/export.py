"""``compt export CKPT OUT_DIR``: write a member in its ecosystem's layout (issue part 6; issue 14).

CLIP: open_clip's ``local-dir:`` folder. LM: a Hugging Face folder (``config.json``,
``model.safetensors``, the tokenizer) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint (CLIP: open_clip local-dir folder; LM: Hugging Face folder)",
        description="CLIP: write OUT_DIR/open_clip_config.json and OUT_DIR/open_clip_model.safetensors, "
        "loadable with open_clip.create_model_and_transforms('local-dir:OUT_DIR') and "
        "open_clip.get_tokenizer('local-dir:OUT_DIR'). LM: write a Hugging Face folder (config.json, "
        "model.safetensors, tokenizer.json) loadable with transformers.AutoModelForCausalLM.from_pretrained.",
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
    from compt.paradigms import paradigm_of_path

    paradigm = paradigm_of_path(args.ckpt)
    try:
        out = paradigm.export(args.ckpt, args.out_dir, force=args.force)
    except CheckpointError as e:  # a corrupt or foreign file is a user error: one line, exit 2
        raise ValueError(str(e)) from e
    print(f"exported {args.ckpt} -> {out}  ({paradigm.how_to_load(out)})")
    return 0
