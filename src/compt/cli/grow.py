"""``compt grow``: initialize a larger member from a trained smaller one (inverse weight init, §3.1.1).

::

    compt grow --teacher runs/vit-t/final.pt --student ViT-S/16 --out runs/vit-s/init.pt
    compt grow --teacher t.pt --student Swin-S --out s.pt --width paper-compat --report grow.json

The student is built fresh (seeded by ``--seed``), grown from the teacher checkpoint, and written as a
compt checkpoint (``model``, ``model_cfg``, ``member`` and a ``grow`` entry with the report summary).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compt.grow import grow_state_dict, list_depth_strategies, list_width_strategies


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "grow",
        help="initialize a larger member from a trained smaller one (inverse weight initialization)",
        description="Grow a trained teacher checkpoint into a freshly built, larger student member "
        "(paper §3.1.1, App. D.1). See docs/grow.md for the strategies.",
    )
    parser.add_argument(
        "--teacher",
        required=True,
        metavar="CKPT",
        help="compt checkpoint of the smaller model, or its run folder (its final.pt)",
    )
    parser.add_argument(
        "--student", required=True, metavar="MEMBER", help="student member name, e.g. ViT-S/16"
    )
    parser.add_argument("--family", default=None, help="family (or family YAML) to look the student up in")
    parser.add_argument("--out", required=True, metavar="CKPT", help="where to write the grown student")
    parser.add_argument(
        "--width",
        default="insert",
        choices=list_width_strategies(),
        help="width strategy (default: insert, the paper's; Fig. A a-c)",
    )
    parser.add_argument(
        "--depth",
        default="duplicate",
        choices=list_depth_strategies(),
        help="depth strategy (default: duplicate, the paper's; Fig. A d-f)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the student's random init and of net2net"
    )
    parser.add_argument(
        "--interpolate-pos",
        action="store_true",
        help="resample the teacher's positional-embedding grid when image sizes differ",
    )
    parser.add_argument(
        "--report", metavar="FILE", default=None, help="also write the per-tensor report as JSON"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compt.engine.checkpoint import (
        CheckpointError,
        check_writable,
        final_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from compt.families import get_member

    start = time.perf_counter()
    member = get_member(args.student, args.family)
    args.teacher = final_checkpoint(args.teacher, "--teacher")
    if Path(args.out).absolute() == args.teacher.absolute():
        raise ValueError(f"--out {args.out} is the teacher itself; write the grown student to another file")
    # Before the work, not as a failed save that advises to "resume" a command that has nothing to resume.
    check_writable(Path(args.out).absolute().parent, "--out")
    if args.report:
        check_writable(Path(args.report).absolute().parent, "--report")
    try:
        teacher = load_checkpoint(args.teacher)
    except CheckpointError as e:  # a user error: one line, not a traceback
        raise ValueError(str(e)) from e
    if "model_cfg" not in teacher:
        raise ValueError(f"{args.teacher} holds no 'model_cfg'; grow needs a checkpoint written by compt")
    torch.manual_seed(args.seed)
    student_sd = member.create().state_dict()
    grow_start = time.perf_counter()
    new_sd, report = grow_state_dict(
        teacher["model"],
        teacher["model_cfg"],
        student_sd,
        member.model_cfg,
        width=args.width,
        depth=args.depth,
        seed=args.seed,
        interpolate_pos=args.interpolate_pos,
        in_place=True,  # the fresh student's tensors are ours: no second copy of a large model
        paradigm=member.paradigm_name,
    )
    grow_s = time.perf_counter() - grow_start
    grow_entry = {"teacher": str(args.teacher), "teacher_member": teacher.get("member"), **report.summary()}
    save_checkpoint(
        args.out,
        {
            "model": new_sd,
            "model_cfg": member.model_config(),
            "member": member.name,
            "paradigm": member.paradigm_name,
            "grow": grow_entry,
        },
    )
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    print(
        f"grew {teacher.get('member', args.teacher)} -> {member.name}: {grow_s:.1f}s growing, "
        f"{time.perf_counter() - start:.1f}s in all (load, build, grow, save); wrote {args.out}"
    )
    print(report.format())
    return 0
