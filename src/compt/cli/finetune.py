"""``compt finetune``: transfer of a CLIP member to a labelled set (issue 16; docs/finetune.md).

    compt finetune --make-set sets/shape --task shape --like runs/demo/chain/bench-M
    compt finetune runs/demo/chain/bench-M --train sets/shape/train --test sets/shape/test --mode linear-probe
    compt finetune runs/demo/chain/bench-M --train sets/shape/train --test sets/shape/test --lr 3e-3
    compt finetune runs/demo/chain/bench-M --train ... --test ... --lr 3e-3 --progressive autoprog-zero --sid

CKPT is a compt checkpoint, a run folder or an exported member. ``linear-probe`` fits a logistic
regression on the frozen image features (C chosen on a validation split, CLIP paper App. A.3);
``full`` trains the image tower and a zero-shot-initialized head on the training engine (AdamW +
cosine, precision, checkpoints and exact resume, metrics.jsonl); ``--progressive autoprog-zero``
unfreezes block groups and raises the resolution over 4 stages (AutoProg-Zero). Every
FinetuneConfig field can come from ``--config run.yaml`` or ``--set key=value`` (e.g. ``--set
autoprog_zero.step_cost=measured``); flags win over the file, ``--set`` over both. Results go to
``<member folder>/finetune/<set>/<variant>-seed<seed>/`` unless ``--out`` says otherwise, where
``compt report`` finds them; rerunning the same command resumes. The last line printed is
``test top-1 NN.NN``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from compt.config import ConfigError, from_dict, override_mapping, read_mapping

# flag -> FinetuneConfig field, for the flags that map one to one.
_FLAGS = {
    "ckpt": "checkpoint",
    "train": "train_dir",
    "test": "test_dir",
    "mode": "mode",
    "out": "out_dir",
    "progressive": "progressive",
    "epochs": "epochs",
    "steps": "steps",
    "batch_size": "global_batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "val_fraction": "val_fraction",
    "precision": "precision",
    "device": "device",
    "seed": "seed",
    "save_every": "save_every_steps",
    "log_every": "log_every_steps",
    "eval_every": "eval_every_steps",
}
_SET_FLAGS = ("task", "num_train", "num_test", "image_size", "like")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="linear probe or full fine-tune of a member on an ImageFolder (AutoProg-Zero optional)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", metavar="CKPT", nargs="?", help="checkpoint file, run folder or export folder")
    p.add_argument("--train", metavar="DIR", help="training ImageFolder (one sub-folder per class)")
    p.add_argument("--test", metavar="DIR", help="test ImageFolder (the same class sub-folders)")
    p.add_argument("--mode", choices=["linear-probe", "full"], help="default full")
    p.add_argument("--out", metavar="DIR", help="run folder (default: <member folder>/finetune/<set>/...)")
    p.add_argument("--progressive", choices=["autoprog-zero"], help="staged unfreezing + resolution")
    p.add_argument("--schedule", choices=["search", "manual"], help="AutoProg-Zero schedule (default search)")
    p.add_argument("--sid", action="store_true", default=None, help="AutoProg-Zero's stage id (SID)")
    p.add_argument("--epochs", type=float, help="passes over the training images (default 10)")
    p.add_argument("--steps", type=int, help="optimizer steps instead of --epochs")
    p.add_argument("--batch-size", type=int, help="images per optimizer step (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 5%% of the run)")
    p.add_argument("--val-fraction", type=float, help="training images held out as validation (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="default auto: bf16 on CUDA")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:K (default auto)")
    p.add_argument("--seed", type=int, help="data order, SID, search batches, validation split (default 0)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100)")
    p.add_argument("--log-every", type=int, help="metrics.jsonl line every N steps (default 10)")
    p.add_argument("--eval-every", type=int, help="test top-1 every N steps (default: start and end only)")
    p.add_argument("--config", help="YAML file with FinetuneConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    s = p.add_argument_group("writing a generated set (instead of fine-tuning)")
    s.add_argument("--make-set", metavar="DIR", help="write DIR/train and DIR/test from the embedded scenes")
    s.add_argument("--task", help="generated task: shape (default) or count")
    s.add_argument("--num-train", type=int, help="training images (default 2000)")
    s.add_argument("--num-test", type=int, help="test images (default 1000)")
    s.add_argument("--image-size", type=int, help="pixels (default 32, or --like's)")
    s.add_argument("--like", metavar="CKPT", help="a member's image size and training scene vocabulary")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The FinetuneConfig of the command line: YAML file, then flags, then ``--set`` overrides."""
    from compt.paradigms.clip.finetune.config import FinetuneConfig

    raw = read_mapping(FinetuneConfig, args.config, allow_empty=True) if args.config else {}
    for flag, name in _FLAGS.items():
        if getattr(args, flag) is not None:
            raw[name] = getattr(args, flag)
    for flag in ("schedule", "sid"):
        if getattr(args, flag) is not None:
            raw.setdefault("autoprog_zero", {})[flag] = getattr(args, flag)
    raw = override_mapping(raw, args.set, where="--set")
    missing = [
        f"--{flag}" for flag, name in (("train", "train_dir"), ("test", "test_dir")) if not raw.get(name)
    ]
    if not raw.get("checkpoint") or missing:
        raise ConfigError(
            "say what to fine-tune on what: compt finetune CKPT --train DIR --test DIR"
            + (f" (missing {', '.join(missing)})" if missing else " (missing CKPT)")
        )
    return from_dict(FinetuneConfig, raw, where=args.config or "arguments")


def _make_set(args: argparse.Namespace) -> int:
    from compt.paradigms.clip.finetune.sets import member_scenes, write_finetune_set

    if args.ckpt or args.train or args.test:
        raise ConfigError(
            "--make-set writes a set; give it no CKPT, --train or --test (fine-tune afterwards)"
        )
    kwargs: dict[str, Any] = {}
    if args.like:
        kwargs["image_size"], kwargs["spec"] = member_scenes(args.like)
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    for flag in ("num_train", "num_test", "seed"):
        if getattr(args, flag) is not None:
            kwargs[flag] = getattr(args, flag)
    train, test = write_finetune_set(args.make_set, args.task or "shape", **kwargs)
    print(f"wrote {train} and {test}")
    return 0


def run(args: argparse.Namespace) -> int:
    from compt.engine.runlog import NonFiniteLossError
    from compt.engine.train import TrainingInterrupted

    if args.make_set:
        return _make_set(args)
    given = [f"--{f.replace('_', '-')}" for f in _SET_FLAGS if getattr(args, f) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply with --make-set DIR")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    from compt.paradigms.clip.finetune.train import finetune

    cfg = build_config(args)
    try:
        result = finetune(cfg)
    except NonFiniteLossError as e:
        print(f"compt finetune: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"compt finetune: {e}", file=sys.stderr)
        return 143
    macs = f", {result.train_macs:.3e} training MACs" if result.train_macs is not None else ""
    zero_shot = f", zero-shot {result.zero_shot_top1:.2f}" if result.zero_shot_top1 is not None else ""
    print(f"{result.member or '?'} {result.label} on {result.set}: {result.steps} steps{macs}, "
          f"{result.wall_s:.1f} s{zero_shot} -> {result.out_dir}")  # fmt: skip
    if result.val_top1 is not None:
        print(f"val top-1 {result.val_top1:.2f}")
    print(f"test top-1 {result.test_top1:.2f}")
    return 0
