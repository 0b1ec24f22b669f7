"""``compt train``: train one member, individually or as a chain link (paper §3.1-3.2, App. B.1).

    compt train --member tiny-S --data synthetic --set data.num_samples=10000 --epochs 2 \\
        --batch-size 256 --out runs/tiny-S
    compt train --member tiny-M --data synthetic --set data.num_samples=10000 --epochs 1 \\
        --batch-size 256 --out runs/tiny-M --teacher runs/tiny-S/final.pt --alpha auto
    compt train --member llama-cpu-S --data stdlib --steps 200 --batch-size 16 --lr 3e-3 --out runs/lm-S
    torchrun --standalone --nproc_per_node 8 -m compt train --member ViT-B/16 --data cc3m.tsv \\
        --epochs 128 --set data.workers=8

``--progressive search`` (or ``manual``) trains the member with AutoProg-One, growing it in depth
and input resolution (``--set progressive.mogrow=false``, ``--set progressive.num_stages=3``, ...).
``--data`` is, for CLIP, a registered kind (``synthetic``), a CSV/TSV table, or webdataset shards
(``'shards/{00000..00331}.tar'``); for an LM, ``stdlib`` (the embedded corpus), a folder of
.txt/.jsonl files or a folder of ``train.bin``/``val.bin`` token files. Every TrainConfig field can
also come from ``--config run.yaml`` or ``--set key=value`` (e.g. ``--set data.num_samples=20000
--set grad_clip=1.0``); flags win over the YAML file and ``--set`` wins over both. Rerunning the
same command resumes the run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from compt.config import ConfigError, from_dict, override_mapping, parse_value, read_mapping
from compt.engine import dist
from compt.engine.checkpoint import final_checkpoint

T = TypeVar("T")

# flag -> TrainConfig field, for the flags that map one to one.
_FLAGS = {
    "member": "member",
    "family": "family",
    "epochs": "epochs",
    "steps": "steps",
    "batch_size": "global_batch_size",
    "accum_steps": "accum_steps",
    "lr": "lr",
    "warmup_steps": "warmup_steps",
    "grad_clip": "grad_clip",
    "precision": "precision",
    "compile": "compile",
    "device": "device",
    "seed": "seed",
    "out": "out_dir",
    "save_every": "save_every_steps",
    "keep_last": "keep_last",
    "log_every": "log_every_steps",
    "teacher": "teacher",
    "width": "width",
    "depth": "depth",
    "alpha": "alpha",
    "alpha_ratio": "alpha_ratio",
    "distill": "distill",
    "parallel": "parallel",
    "deterministic": "deterministic",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one member (baseline, or a chain link with --teacher)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--member", help="member to train, e.g. ViT-B/16, tiny-S (compt plan lists families)")
    p.add_argument("--family", help="family name or YAML file holding --member (default: any registered)")
    p.add_argument(
        "--data",
        help="CLIP: synthetic | TABLE.csv/.tsv | 'SHARDS/{00000..00099}.tar'; "
        "LM: stdlib | TEXT_DIR | TOKENS_DIR",
    )
    p.add_argument("--epochs", type=float, help="passes over the data (fractions allowed; default 1)")
    p.add_argument("--steps", type=int, help="optimizer steps instead of --epochs")
    p.add_argument("--batch-size", type=int, help="global batch size over all ranks (default 1024, Table C)")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3, Table C)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 8000, or 1000 for a link)")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm (default 0 = off)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="default auto: bf16 on CUDA")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the student")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:K (default auto)")
    p.add_argument("--seed", type=int, help="model init / growth seed (default 0)")
    p.add_argument("--out", help="output folder (default runs/<member>)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 1000)")
    p.add_argument("--keep-last", type=int, help="step checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, help="metrics.jsonl line every N steps (default 10)")
    p.add_argument(
        "--eval-every",
        type=_non_negative,
        metavar="N",
        help="evaluate (CLIP: zero-shot on the embedded sets; LM: validation loss) every N steps; "
        "0 = only at the end; default: none",
    )
    p.add_argument(
        "--teacher",
        help="teacher: a checkpoint, or the run folder holding its final.pt (the previous member); "
        "makes the run a chain link",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="if --out holds a run of another config, move it to OUT.replaced-N and train afresh "
        "(default: refuse, naming what changed)",
    )
    p.add_argument("--width", help="growth strategy in width (default insert, App. D.1)")
    p.add_argument("--depth", help="growth strategy in depth (default duplicate, App. D.1)")
    p.add_argument("--alpha", help="IFD weight: a number (default 500, App. B.1) or 'auto'")
    p.add_argument("--alpha-ratio", type=float, help="target L_IFD/L_task for --alpha auto (default 0.1)")
    p.add_argument(
        "--progressive",
        choices=["search", "manual"],
        help="AutoProg-One: grow the member in depth and input resolution while it trains, its schedule "
        "searched or the manual one (docs/train.md; more options: --set progressive.KEY=VALUE)",
    )
    p.add_argument("--distill", help="what a link distills: feature (default, Eq. 1) | logit (LM: KL)")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], help="several processes: ddp (default) | fsdp2")
    p.add_argument("--config", help="YAML file with TrainConfig fields (data: as a mapping)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any field (dotted)"
    )
    p.set_defaults(func=run)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: evaluate only at the end), got {value}")
    return value


def build_config(args: argparse.Namespace):
    """The TrainConfig of the command line: YAML file, then flags, then ``--set`` overrides."""
    from compt.engine.train import TrainConfig

    raw = read_mapping(TrainConfig, args.config, allow_empty=True) if args.config else {}
    for flag, field in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            raw[field] = parse_value(value) if flag == "alpha" else value
    if args.data:
        from compt.families import get_member

        if not raw.get("member"):
            raise ConfigError("say which member to train: --member NAME (e.g. tiny-S, ViT-B/16)")
        paradigm = get_member(str(raw["member"]), raw.get("family")).paradigm
        raw["data"] = {**(raw.get("data") or {}), **paradigm.data_flag(args.data)}
    raw.setdefault("data", {})
    if args.progressive:  # on top of a YAML file's progressive: mapping, under --set's keys
        raw["progressive"] = {**(raw.get("progressive") or {}), "schedule": args.progressive}
    raw = override_mapping(raw, args.set, where="--set")
    if not raw.get("member"):
        raise ConfigError("say which member to train: --member NAME (e.g. tiny-S, ViT-B/16)")
    raw.setdefault("out_dir", str(Path("runs") / str(raw["member"]).replace("/", "-")))
    if raw.get("teacher"):  # a run folder too, as `compt eval` takes one (issue 11)
        raw["teacher"] = str(final_checkpoint(str(raw["teacher"]), "--teacher"))
    return from_dict(TrainConfig, raw, where=args.config or "arguments")


def run(args: argparse.Namespace) -> int:
    from compt.engine.runlog import setup_logging
    from compt.engine.train import train_member

    setup_logging()
    cfg = build_config(args)
    evaluate = None
    if args.eval_every is not None:
        from compt.families import get_member

        member = get_member(cfg.member, cfg.family)
        evaluate = member.paradigm.evaluator(member, data_cfg=cfg.data)
        cfg = replace(cfg, eval_every_steps=args.eval_every)
    result = run_training("train", lambda: train_member(cfg, evaluate=evaluate, retrain=args.retrain))
    if isinstance(result, int):
        return result
    if dist.launch_rank() == 0:
        print(
            f"{cfg.member}: {result.steps} steps, {result.samples_seen:,} samples, "
            f"{result.train_macs / 1e12:.4g} TMACs, {result.wall_s:.1f} s -> {result.final_checkpoint}"
        )
        for key, value in sorted(result.metrics.items()):
            print(f"  {key}: {value:.2f}")
    return 0


def run_training(command: str, fn: Callable[[], T]) -> T | int:
    """``fn()``, or the exit status of a training run that stopped, after one line saying why.

    Shared by ``compt train`` and ``compt chain run``: a NaN loss (1), another run in the folder
    (2), SIGTERM (143) or Ctrl-C (130, also when it lands outside the training loop) are messages
    with what to do next, never a traceback.
    """
    from compt.engine.lock import FolderInUseError
    from compt.engine.train import NonFiniteLossError, TrainingInterrupted

    try:
        return fn()
    except NonFiniteLossError as e:
        print(f"compt {command}: error: {e}", file=sys.stderr)
        return 1
    except FolderInUseError as e:
        print(f"compt {command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"compt {command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop (setup, evaluation, export)
        print(
            f"\ncompt {command}: interrupted by Ctrl-C; rerun the same command to resume from the newest "
            "checkpoint",
            file=sys.stderr,
        )
        return 130
