"""Fine-tuning's pieces end to end on the generated set: linear probe, full fine-tune, AutoProg-Zero.

    compt chain run configs/demo.yaml --individual          # or any trained member
    OMP_NUM_THREADS=1 python benchmarks/finetune_pieces.py runs/demo/individual/tiny-S/final.pt \
        --out benchmarks/results/finetune --epochs 8 --seeds 0

Writes the fine-tuning set (``--task`` of compt.paradigms.clip.finetune.sets, in the demo's scene
vocabulary so its class names are words the member was trained on), then per seed: the linear probe
and one fine-tuning run per ``--modes`` entry -- ``full`` (everything trains at full resolution),
``manual`` / ``search`` (AutoProg-Zero's fixed or searched schedule), ``search-sid`` (searched,
with SID) -- each AdamW + warmup + cosine over the same steps and batches, scored top-1 on the test
split at full resolution. Training MACs are exact per stage (stage_step_macs) plus the search's own.

This loop is a stand-in until the engine's finetune mode lands (issue 16, second step: precision,
checkpoints, exact resume and JSONL come from there); it reads only the pieces' public functions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from compt.paradigms.clip.data.synthetic import SyntheticSpec
from compt.paradigms.clip.finetune.head import (
    build_classifier,
    classification_loss,
    load_clip,
    resize_images,
    top1,
)
from compt.paradigms.clip.finetune.probe import ProbeConfig, probe_checkpoint
from compt.paradigms.clip.finetune.search import AutoProgZeroConfig, plan_stage, stage_step_macs
from compt.paradigms.clip.finetune.sets import load_splits, write_finetune_set
from compt.paradigms.clip.finetune.unfreeze import StagePlan, enter_stage, stage_of_step

# configs/demo.yaml's scene vocabulary (the member's pretraining captions name these shapes).
DEMO_SPEC = SyntheticSpec(
    shapes=("circle", "square", "triangle", "cross", "ring", "star"),
    colours=("red", "green", "blue", "yellow"),
    sizes=("medium", "large"),
    textures=("solid",),
    backgrounds=("black", "white"),
    patterns=("plain",),
    colour_jitter=0.04,
    pixel_noise=0.01,
)


def finetune(ckpt, train, test, mode: str, seed: int, args) -> dict:
    """One fine-tuning run; returns test top-1, training MACs (search included) and wall seconds."""
    torch.manual_seed(seed)
    model, model_cfg, _ = load_clip(ckpt)
    apz = None
    if mode != "full":
        apz = AutoProgZeroConfig(
            schedule="manual" if mode == "manual" else "search", sid=mode == "search-sid"
        )
    clf = build_classifier(
        model,
        model_cfg,
        train.classnames,
        train.templates,
        num_stages=apz.num_stages if apz and apz.sid else None,
    )
    opt = torch.optim.AdamW(clf.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train.labels) // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    gen = torch.Generator().manual_seed(seed)
    full = StagePlan(apz.num_stages if apz else 1, clf.image_size)
    plan, stage, macs, log = full, -1, 0, []
    step_macs = stage_step_macs(clf, full, *_first(train), args.batch_size, full.level)[0] if not apz else 0
    start = time.perf_counter()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train.labels), generator=gen)
        idx = order[(step % steps_per_epoch) * args.batch_size :][: args.batch_size]
        if apz is not None and stage_of_step(step, total, apz.num_stages) != stage:
            stage = stage_of_step(step, total, apz.num_stages)
            search = [
                (train.images[order[i * 16 : (i + 1) * 16]], train.labels[order[i * 16 : (i + 1) * 16]])
                for i in range(apz.search_batches)
            ]
            choice = plan_stage(clf, stage, None if stage == 0 else plan, search, apz, args.batch_size)
            plan = choice.plan
            enter_stage(clf, opt, plan, apz.num_stages)
            step_macs = stage_step_macs(clf, plan, *_first(train), args.batch_size, apz.num_stages)[0]
            macs += choice.search_macs
            scores = [[c.plan.level, c.plan.resolution, c.ntk, c.zico, c.step_cost] for c in choice.scores]
            log.append({"stage": stage, "how": choice.how, "level": plan.level, "resolution": plan.resolution,
                        "scores": scores})  # fmt: skip
        ids = None
        if clf.stage_embedding is not None:
            ids = clf.stage_embedding.draw_ids(stage, len(idx))
        loss, _ = classification_loss(
            clf, resize_images(train.images[idx], plan.resolution), train.labels[idx], ids
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        macs += step_macs
    wall = time.perf_counter() - start
    return {"mode": mode, "seed": seed, "test_top1": top1(clf, test.images, test.labels), "train_macs": macs,
            "wall_s": wall, "steps": total, "stages": log}  # fmt: skip


def _first(task):
    return task.images[:1], task.labels[:1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a compt checkpoint, run folder or export folder of a CLIP member")
    p.add_argument("--out", default="benchmarks/results/finetune")
    p.add_argument("--task", default="shape")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seeds", default="0")
    p.add_argument("--modes", default="full,manual,search,search-sid")
    args = p.parse_args()
    out = Path(args.out)
    train_dir, test_dir = write_finetune_set(
        out / "set", args.task, num_train=args.num_train, num_test=args.num_test, spec=DEMO_SPEC
    )
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        probe, info = probe_checkpoint(args.ckpt, train_dir, test_dir, ProbeConfig(seed=seed))
        rows.append({"mode": "linear-probe", "seed": seed, "test_top1": probe.test_top1, "c": probe.c})
        print(f"seed {seed} linear-probe  test top-1 {probe.test_top1:.2f}  (C={probe.c:.3g})", flush=True)
        train, test = load_splits(train_dir, test_dir, info["image_size"])
        for mode in args.modes.split(","):
            r = finetune(args.ckpt, train, test, mode, seed, args)
            rows.append(r)
            plans = [(s["level"], s["resolution"]) for s in r["stages"]]
            print(f"seed {seed} {mode:12s} test top-1 {r['test_top1']:.2f}  MACs {r['train_macs']:.3e}  "
                  f"wall {r['wall_s']:.1f} s  (level, px) per stage {plans}", flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
