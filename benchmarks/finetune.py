"""Fine-tuning a family (issue 16): transfer per member of a chain and of its baseline, and AutoProg-Zero
against the full fine-tune at equal test accuracy. Every run is a ``compt finetune`` run.

    make demo    # or: compt chain run configs/demo.yaml --individual && compt chain run configs/demo.yaml
    OMP_NUM_THREADS=1 python benchmarks/finetune.py runs/demo --out benchmarks/results/finetune

The protocol (docs/finetune.md):

1. The set: ``compt finetune --make-set RUN/sets/shape --task shape --like <first member>`` (the
   members' own scene vocabulary, at their resolution), ``--num-train`` / ``--num-test`` images.
2. The learning rate, on a validation split: the full fine-tune of the AutoProg-Zero member with
   20% of the training images held out, seed 0, for each ``--lrs``; the best validation top-1 wins
   and is used by every fine-tune below (the test split plays no part in the choice).
3. Transfer: linear probe and full fine-tune of every member of ``RUN/chain`` and ``RUN/individual``,
   each seed (the seed orders the data; the pretrained member is the one the demo trained).
4. AutoProg-Zero on ``--apz-member`` of the chain: manual and searched schedules, with and without
   SID, each seed, the same epochs and lr as the full fine-tune. The full runs of that member
   evaluate every ``--eval-every`` steps: the training MACs (and wall seconds) at which the seeds'
   mean full curve first reaches an AutoProg-Zero variant's mean final top-1 (linear interpolation)
   over that variant's own cost is its speedup at equal test accuracy. Every searched stage's
   candidates with their cost / NTK / ZiCo ranks, and what the proxies alone (or a cost weight of
   0.5) would have chosen from the same scores.
5. The proxies at stage 0 for every (level, resolution), over 5 independent draws of the search
   batches, on the pretrained AutoProg-Zero member (no training).
6. Both schedules with ``min_scale`` 0.5 (lowest resolution 4 x 4 patches instead of 2 x 2), each
   seed, filed under ``RUN/finetune-diag/``: a diagnostic of the searched schedule's collapse.

Runs are filed under each member's folder (``compt report RUN`` tabulates them), the learning-rate
runs under ``RUN/finetune-lr/``; rerunning resumes and skips finished runs. Writes ``OUT/results.json``
(every run's result) and ``OUT/tables.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from compt.engine.runlog import read_metrics
from compt.paradigms.clip.finetune.config import FinetuneConfig
from compt.paradigms.clip.finetune.head import build_classifier, classification_loss, load_clip
from compt.paradigms.clip.finetune.proxies import ntk_score, zico_score
from compt.paradigms.clip.finetune.search import AutoProgZeroConfig, competition_ranks
from compt.paradigms.clip.finetune.sets import load_splits, member_scenes, write_finetune_set
from compt.paradigms.clip.finetune.stages import search_batches
from compt.paradigms.clip.finetune.train import finetune
from compt.paradigms.clip.finetune.unfreeze import set_level, stage_resolutions
from compt.paradigms.clip.progressive import resize_images

VARIANTS = {  # label -> AutoProg-Zero settings
    "autoprog-zero-manual": AutoProgZeroConfig(schedule="manual"),
    "autoprog-zero-manual-sid": AutoProgZeroConfig(schedule="manual", sid=True),
    "autoprog-zero-search": AutoProgZeroConfig(schedule="search"),
    "autoprog-zero-search-sid": AutoProgZeroConfig(schedule="search", sid=True),
}


def _members(root: Path, kind: str) -> list[tuple[str, Path]]:
    summary = json.loads((root / kind / "summary.json").read_text())
    return [(m["name"], root / kind / Path(m["metrics_file"]).parent) for m in summary["members"]]


def _mean_std(values: list[float]) -> str:
    return (
        f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"
        if len(values) > 1
        else f"{values[0]:.1f}"
    )


def _curve(out_dir: str) -> list[tuple[float, float, float]]:
    """(train MACs, wall s, test top-1) at each evaluation of a run, from its metrics.jsonl."""
    records = read_metrics(Path(out_dir) / "metrics.jsonl")
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    points = []
    for r in (r for r in records if r["kind"] == "eval"):
        if r["step"] == 0:  # the zero-shot head, before any cost
            points.append((0, 0.0, r["test_top1"]))
        else:  # log_every_steps = eval_every_steps: a train record at every evaluation
            points.append((train[r["step"]]["train_macs"], train[r["step"]]["wall_s"], r["test_top1"]))
    return points


def _reach(curve: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(MACs, wall s) at which ``curve`` first reaches ``target`` top-1 (linear between evaluations)."""
    for (m0, w0, a0), (m1, w1, a1) in zip(curve, curve[1:], strict=False):
        if a1 >= target:
            f = 1.0 if a1 == a0 else max(0.0, (target - a0) / (a1 - a0))
            return m0 + f * (m1 - m0), w0 + f * (w1 - w0)
    return None


def _at(cfg: FinetuneConfig, **changes: Any) -> FinetuneConfig:
    """``cfg`` with ``changes``, filed in its default folder (<member>/finetune/<set>/<label>-seed<seed>)."""
    return replace(cfg, out_dir=None, **changes)


def _run(cfg: FinetuneConfig) -> dict[str, Any]:
    result = finetune(cfg).to_dict()
    macs = f"{result['train_macs']:.3e} MACs" if result["train_macs"] is not None else "no training"
    head = f"{result['member']} {result['label']} seed {cfg.seed}"
    print(f"{head}: test top-1 {result['test_top1']:.2f}, {macs}, {result['wall_s']:.1f} s", flush=True)
    return result


def _speedups(full: list[dict], variants: dict[str, list[dict]]) -> list[str]:
    """The equal-accuracy table: each variant's mean top-1 against the seeds' mean full curve."""
    curves = [_curve(r["out_dir"]) for r in full]
    mean_curve = [
        tuple(statistics.fmean(c[i][j] for c in curves) for j in range(3)) for i in range(len(curves[0]))
    ]
    f_macs, f_wall = (
        statistics.fmean(r["train_macs"] for r in full),
        statistics.fmean(r["wall_s"] for r in full),
    )
    rows = [
        "| variant | test top-1 | training MACs | MACs / full | full reaches it at | MAC speedup "
        "| wall speedup | (level, px) per stage, seed 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows.append(
        f"| full | {_mean_std([r['test_top1'] for r in full])} | {f_macs:.3e} | 1 | | 1 | 1 | all, full |"
    )
    for label, runs in variants.items():
        top1 = statistics.fmean(r["test_top1"] for r in runs)
        macs, wall = (
            statistics.fmean(r["train_macs"] for r in runs),
            statistics.fmean(r["wall_s"] for r in runs),
        )
        hit = _reach(mean_curve, top1)
        plans = " ".join(f"({s['level']}, {s['resolution']})" for s in runs[0]["stages"])
        if hit is None:  # better than the full run ever got: the speedup is at least the whole run's
            reach, mac_x, wall_x = "never", f"> {f_macs / macs:.2f}", f"> {f_wall / wall:.2f}"
        elif hit[0] == 0:  # no better than the zero-shot head before any step: no speedup to speak of
            reach, mac_x, wall_x = "at step 0 (zero-shot)", "none", "none"
        else:
            reach, mac_x, wall_x = f"{hit[0]:.3e}", f"{hit[0] / macs:.2f}", f"{hit[1] / wall:.2f}"
        cells = [label, _mean_std([r["test_top1"] for r in runs]), f"{macs:.3e}", f"{macs / f_macs:.2f}"]
        rows.append("| " + " | ".join(cells + [reach, mac_x, wall_x, plans]) + " |")
    return rows


def _search_analysis(runs: list[dict]) -> list[str]:
    """Per searched stage: each candidate's ranks, and what the proxies alone would have chosen."""
    rows = [
        "| run | stage | candidates (level, px): cost / NTK / ZiCo rank | chosen | proxies alone "
        "| cost weight 0.5 |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        for s in (s for s in r["stages"] if s["how"] == "search"):
            sc = s["scores"]
            cost = competition_ranks([c["step_cost"] for c in sc], higher_is_better=False)
            ntk = competition_ranks([c["ntk"] if c["ntk"] is not None else float("-inf") for c in sc], True)
            zico = competition_ranks([c["zico"] for c in sc], higher_is_better=True)
            name = [f"({c['level']}, {c['resolution']})" for c in sc]
            cells = ", ".join(f"{n}: {a}/{b}/{z}" for n, a, b, z in zip(name, cost, ntk, zico, strict=True))

            def pick(w, cost=cost, ntk=ntk, zico=zico, name=name):
                totals = [w * a + 0.5 * b + 0.5 * z for a, b, z in zip(cost, ntk, zico, strict=True)]
                return name[totals.index(min(totals))]

            chosen = f"({s['level']}, {s['resolution']})"
            run = f"{r['label']} s{r['seed']}"
            rows.append(f"| {run} | {s['stage']} | {cells} | {chosen} | {pick(0.0)} | {pick(0.5)} |")
    return rows


def _coarsest_grid(cfg: FinetuneConfig, root: Path, name: str, seeds: list[int]) -> list[str]:
    """Step 6: the schedules with their lowest resolution at half size (4 x 4 patches, not 2 x 2).

    A diagnostic of the searched schedule's collapse: is it the 2 x 2-patch grid a 32 px member
    trains on at a quarter of its size? (DiT's AutoProg-Zero keeps 4 x 4 latent tokens there.)
    """
    rows = [
        "| variant, min_scale 0.5 | test top-1 | MACs / full | (level, px) per stage, seed 0 |",
        "|---|---|---|---|",
    ]
    full = statistics.fmean(_run(_at(cfg, seed=s))["train_macs"] for s in seeds)  # the runs of step 4
    for schedule in ("manual", "search"):
        apz = AutoProgZeroConfig(schedule=schedule, min_scale=0.5)
        runs = [
            _run(replace(cfg, progressive="autoprog-zero", autoprog_zero=apz, seed=s,
                         out_dir=str(root / "finetune-diag" / name / f"{schedule}-min0.5-seed{s}")))
            for s in seeds
        ]  # fmt: skip
        plans = " ".join(f"({st['level']}, {st['resolution']})" for st in runs[0]["stages"])
        macs = statistics.fmean(r["train_macs"] for r in runs) / full
        rows.append(f"| {schedule} | {_mean_std([r['test_top1'] for r in runs])} | {macs:.2f} | {plans} |")
    return [f"## The coarsest grid ({name}, lowest resolution 16 px)", ""] + rows + [""]


def _proxies(cfg: FinetuneConfig, draws: int = 5) -> list[str]:
    """Step 5: every (level, resolution)'s NTK and ZiCo on the pretrained member, over independent draws.

    No training: the zero-shot-initialized classifier, as stage 0's search sees it. Says whether the
    proxies favour a higher resolution at all, and how stable their ranks are from draw to draw.
    """
    model, model_cfg, _ = load_clip(cfg.checkpoint)
    train, _ = load_splits(cfg.train_dir, cfg.test_dir, int(model_cfg["vision_cfg"]["image_size"]))
    clf = build_classifier(model, model_cfg, train.classnames, train.templates)
    apz = cfg.autoprog_zero
    res = stage_resolutions(clf.image_size, clf.patch_size, apz.num_stages, apz.min_scale)
    plans = [(level, r) for r in res for level in range(1, apz.num_stages + 1)]
    ntk, zico = {p: [] for p in plans}, {p: [] for p in plans}
    loss = lambda m, x, y: classification_loss(m, x, y)[0]  # noqa: E731
    for d in range(draws):
        batches = search_batches(train, apz, seed=1000 + d, stage=0)
        for level, r in plans:
            set_level(clf, level, apz.num_stages)
            xs = [(resize_images(x, r), y) for x, y in batches]
            ntk[level, r].append(statistics.fmean(ntk_score(clf, x) for x, _ in xs[: apz.ntk_batches]))
            zico[level, r].append(zico_score(clf, xs[apz.ntk_batches : apz.search_batches], loss))
    rows = [
        "| level | px | NTK score | ZiCo | NTK rank by draw | ZiCo rank by draw |",
        "|---|---|---|---|---|---|",
    ]
    ranks = {
        name: list(
            zip(*[competition_ranks([v[p][d] for p in plans], True) for d in range(draws)], strict=True)
        )
        for name, v in (("ntk", ntk), ("zico", zico))
    }
    for i, (level, r) in enumerate(plans):
        cells = [str(level), str(r), _mean_std(ntk[level, r]), _mean_std(zico[level, r])]
        cells += [" ".join(map(str, ranks["ntk"][i])), " ".join(map(str, ranks["zico"][i]))]
        rows.append("| " + " | ".join(cells) + " |")
    return [f"## Proxies at stage 0 ({draws} draws of the search batches)", ""] + rows + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "run", help="a compt chain run output folder holding chain/ and individual/ (e.g. runs/demo)"
    )
    p.add_argument("--out", default="benchmarks/results/finetune")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num-train", type=int, default=1500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--apz-member", help="chain member for AutoProg-Zero (default: the chain's last)")
    p.add_argument("--eval-every", type=int, default=16, help="steps between evaluations of its full runs")
    p.add_argument("--parts", default="transfer,autoprog,proxies,grid")
    args = p.parse_args()
    root, out, seeds = Path(args.run), Path(args.out), [int(s) for s in args.seeds.split(",")]
    chain, individual = _members(root, "chain"), _members(root, "individual")
    sets = root / "sets" / "shape"
    if not (sets / "test" / "classnames.yaml").is_file():
        image_size, spec = member_scenes(chain[0][1])
        sizes = {"num_train": args.num_train, "num_test": args.num_test, "image_size": image_size}
        write_finetune_set(sets, "shape", spec=spec, **sizes)
    apz_name, apz_dir = next(m for m in chain if m[0] == args.apz_member) if args.apz_member else chain[-1]
    base = FinetuneConfig(
        checkpoint=str(apz_dir), train_dir=str(sets / "train"), test_dir=str(sets / "test"),
        epochs=args.epochs, global_batch_size=args.batch_size, save_every_steps=50,
        log_every_steps=args.eval_every,
    )  # fmt: skip
    lr, doc, tables = _choose_lr(
        base, root / "finetune-lr" / apz_name, [float(x) for x in args.lrs.split(",")]
    )
    base = replace(base, lr=lr)
    if "transfer" in args.parts:
        tables += _transfer(base, chain, individual, seeds, doc, eval_at={apz_dir: args.eval_every})
    if "autoprog" in args.parts:
        tables += _autoprog(replace(base, eval_every_steps=args.eval_every), apz_name, seeds, doc)
    if "proxies" in args.parts:
        tables += _proxies(base)
    if "grid" in args.parts:
        tables += _coarsest_grid(replace(base, eval_every_steps=args.eval_every), root, apz_name, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "tables.md").write_text("\n".join(tables) + "\n")
    print("\n".join(tables))


def _choose_lr(base: FinetuneConfig, folder: Path, lrs: list[float]) -> tuple[float, dict, list[str]]:
    """Step 2: the lr of the best validation top-1 (20% of the training images held out, seed 0)."""
    runs = {lr: _run(replace(base, lr=lr, val_fraction=0.2, out_dir=str(folder / f"lr{lr:g}"))) for lr in lrs}
    lr = max(runs, key=lambda k: runs[k]["val_top1"])
    print(f"lr chosen on validation: {lr:g}", flush=True)
    scores = ", ".join(f"{k:g}: {v['val_top1']:.1f}" for k, v in runs.items())
    doc = {"lr": lr, "lr_runs": list(runs.values()), "transfer": [], "autoprog": []}
    return lr, doc, [f"lr chosen on the validation split: {lr:g} (validation top-1 {scores})", ""]


def _same_weights(a: Path, b: Path | None) -> bool:
    """Whether two members' final.pt are the same file content (the chain reuses its first member)."""
    if b is None:
        return False
    digest = [(f / "final.pt.sha256").read_text().split()[0] for f in (a, b)]
    return digest[0] == digest[1]


def _transfer(base, chain, individual, seeds, doc, eval_at) -> list[str]:
    """Step 3: linear probe and full fine-tune of every member of both trees, each seed."""
    rows = ["| member | kind | linear probe | full fine-tune | zero-shot |", "|---|---|---|---|---|"]
    twins = {name: folder for name, folder in individual}
    for kind, members in (("chain", chain), ("individual", individual)):
        for name, folder in members:
            if kind == "chain" and _same_weights(folder, twins.get(name)):
                rows.append(
                    f"| {name} | chain | (the individual twin itself: the chain's first member) | | |"
                )
                continue
            cfg = _at(base, checkpoint=str(folder), eval_every_steps=eval_at.get(folder, 0))
            probe = [_run(_at(cfg, mode="linear-probe", seed=s)) for s in seeds]
            full = [_run(_at(cfg, seed=s)) for s in seeds]
            doc["transfer"] += probe + full
            zero_shot = statistics.fmean(r["zero_shot_top1"] for r in full)
            cells = [
                name,
                kind,
                _mean_std([r["test_top1"] for r in probe]),
                _mean_std([r["test_top1"] for r in full]),
            ]
            rows.append("| " + " | ".join(cells) + f" | {zero_shot:.1f} |")
    return ["## Transfer", ""] + rows + [""]


def _autoprog(cfg, name, seeds, doc) -> list[str]:
    """Step 4: AutoProg-Zero's variants against the full fine-tune, each seed."""
    full = [_run(_at(cfg, seed=s)) for s in seeds]
    variants = {
        label: [_run(_at(cfg, progressive="autoprog-zero", autoprog_zero=apz, seed=s)) for s in seeds]
        for label, apz in VARIANTS.items()
    }
    doc["autoprog"] = full + [r for runs in variants.values() for r in runs]
    searched = [r for label, runs in variants.items() if "search" in label for r in runs]
    head = [f"## AutoProg-Zero on {name}", ""]
    return head + _speedups(full, variants) + ["", "### Searched stages", ""] + _search_analysis(searched)


if __name__ == "__main__":
    main()
