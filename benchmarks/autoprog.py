"""Does AutoProg-One pay on compt's benchmark? Alone, in a chain, and its options (issue 15).

Run from the repository root (``--workers 2``: one training process per core)::

    .venv/bin/python benchmarks/autoprog.py --out benchmarks/results/autoprog        # 3 seeds
    .venv/bin/python benchmarks/autoprog.py --smoke --out /tmp/autoprog-smoke        # 1 seed, 2 members
    .venv/bin/python benchmarks/autoprog.py --out ... --set seeds='[0]' ablation_member='"micro-L"'
    .venv/bin/python benchmarks/autoprog.py --bench benchmarks/autoprog_bench.py:autoprog_bench \
        --out benchmarks/results/autoprog-bench                                   # issue 12's benchmark

The protocol (``autoprog_lib``): the micro chain's members trained individually, plain and with
AutoProg-One's searched schedule; the chain, and the chain with AutoProg-One on its first member and
every link; on one member, the manual schedule with and without MoGrow and with AdamW reset. Every run
is scored by the held-out validation loss on two splits of held-out scenes; nothing is chosen, the
tables report the ``test`` split. Lossless: the mean loss is within 2 x the baseline's seed std.

Results: ``<out>/results.json`` (every run and table), ``<out>/README.md`` (the tables) and
``<out>/autoprog.png``. Rerunning the same command skips finished runs. The last line printed is
``autoprog: member=<the largest> macs=<x>x wall=<x>x gap=<loss> lossless=<yes|no> chainap=<x>x``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autoprog_lib import ABLATIONS, ARMS, AutoProgBench, jobs, run_job, tables  # noqa: E402
from recipe import load_bench  # noqa: E402
from reproduce_lib import run_jobs  # noqa: E402

# A smoke run of every arm: one seed, a 2-member chain, short runs (not a measurement).
SMOKE = dict(members=("micro-XS", "micro-S"), seeds=(0,), baseline_steps=120, link_fraction=0.5,
             ablation_member="micro-S", val_images=256)  # fmt: skip


def warm(bench: AutoProgBench) -> None:
    """Render the training scenes once, before the process pool forks: each worker would otherwise render
    its own copy during its first run, and that run's wall time would count it (a bias of ~20 s)."""
    import numpy as np

    from compt.config import from_dict
    from compt.families import get_member
    from compt.paradigms.clip.data import DataConfig, build_dataset

    member = get_member(bench.members[0], bench.family)
    data = from_dict(DataConfig, bench.train_fields()["data"])
    scenes = build_dataset(data, image_size=member.image_size, context_length=member.context_length)
    rng = np.random.default_rng(0)
    for i in range(len(scenes)):
        scenes.load(i, rng)


def run(bench: AutoProgBench, out: Path, workers: int, log=print) -> dict[str, Any]:
    """Train every run (resumably) and build the tables; returns what results.json holds."""
    start = time.perf_counter()
    todo = jobs(bench)
    log(f"{len(todo)} runs; rendering the training scenes first")
    warm(bench)
    runs = run_jobs(bench, todo, str(out), workers, log=log, runner=run_job)
    # A baseline adopted from a restored record (reproduce.py --restore keeps no weights of runs that
    # teach nothing) has only reproduce's split, the test split: then no validation table at all.
    scored = all("val" in r["metrics"] for r in runs.values())
    return {
        "bench": bench.to_dict(),
        "arms": ARMS,
        "tables": tables(bench, runs, "test"),
        "val_tables": tables(bench, runs, "val") if scored else None,
        "runs": runs,
        "wall_minutes": (time.perf_counter() - start) / 60,
    }


def time_pairs(bench: AutoProgBench, out: Path, log=print) -> dict[str, Any]:
    """Training time of each member plain and with AutoProg-One (seed 0), run back to back in this one
    process: the CPU time (``time.process_time``, one torch thread) is what a shared machine's load
    leaves alone, unlike the wall times of the pool's runs. Writes ``<out>/timing.json``."""
    import torch

    from compt.config import from_dict
    from compt.engine.train import TrainConfig, train_member

    torch.set_num_threads(1)
    warm(bench)
    timing: dict[str, Any] = {}
    for member in bench.members:
        row = {}
        for arm, options in (("baseline", None), ("ap", ARMS["ap"])):
            folder = str(out / "runs" / f"timing_{arm}_{member}")  # runs/: checkpoints, not committed
            fields = bench.train_fields() | dict(member=member, family=bench.family, out_dir=folder,
                                                 steps=bench.baseline_steps, device="cpu", save_every_steps=0,
                                                 progressive=options)  # fmt: skip
            cpu, wall = time.process_time(), time.perf_counter()
            result = train_member(from_dict(TrainConfig, fields, where="timing"))
            row[arm] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                        "train_wall_s": result.wall_s, "train_macs": result.train_macs}  # fmt: skip
        row["cpu_x"] = row["baseline"]["cpu_s"] / row["ap"]["cpu_s"]
        row["macs_x"] = row["baseline"]["train_macs"] / row["ap"]["train_macs"]
        log(f"  {member}: CPU {row['baseline']['cpu_s']:.0f} s plain, {row['ap']['cpu_s']:.0f} s AutoProg "
            f"({row['cpu_x']:.2f}x; MACs {row['macs_x']:.3f}x)")  # fmt: skip
        timing[member] = row
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    return timing


def _loss(g: dict[str, Any]) -> str:
    return f"{g['loss']['mean']:.4f} ± {g['loss']['std']:.4f}"


def _schedule(g: dict[str, Any]) -> str:
    """The searched stages' choices of each seed, e.g. ``v1-t1-r16 v2-t2-r24 ...`` (``-``: none)."""
    seeds = []
    for sched in g["schedules"]:
        choices = (sched or {}).values()
        shapes = [f"v{c['vision_layers']}-t{c['text_layers']}-r{c['image_size']}" for c in choices]
        seeds.append(" ".join(shapes) or "-")
    return "; ".join(seeds)


def write_readme(results: dict[str, Any], folder: Path) -> Path:
    """The three tables as Markdown (test split)."""
    bench, t = results["bench"], results["tables"]
    lines = [
        f"# AutoProg-One on `{bench['name']}` (issue 15)",
        "",
        f"Command: `{results.get('command', '')}`; {results['wall_minutes']:.1f} min (2 shared cores).",
        f"Members {', '.join(bench['members'])}: {bench['baseline_steps']} steps each; links "
        f"{bench['link_fraction']:g} of that; seeds {list(bench['seeds'])}; `{bench['metric']}` on the test "
        "split (lower is better; mean ± std over seeds). Lossless: gap <= 2 x the baseline's std.",
        "",
        "## AutoProg alone vs individual training (equal steps)",
        "",
        "| member | baseline | AutoProg | gap | lossless | MACs x | wall x | searched stages (per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in t["members"].items():
        v = r["versus"]
        lines.append(f"| {m} | {_loss(r['baseline'])} | {_loss(r['ap'])} | {v['gap']:+.4f} | "
                     f"{'yes' if v['lossless'] else 'no'} | {v['macs_x']:.3f} | {v['wall_x']:.2f} | "
                     f"{_schedule(r['ap'])} |")  # fmt: skip
    lines += ["", "## The family: individual, AutoProg only, chain, chain + AutoProg", ""]
    lines += ["| family | total MACs (T) | MACs x | wall x | worst gap | lossless | per-member gap |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for arm, f in t["family"].items():
        gaps = ", ".join(f"{m} {r['gap']:+.4f}" for m, r in f["members"].items())
        lines.append(f"| {arm} | {f['train_macs'] / 1e12:.3f} | {f['macs_x']:.3f} | {f['wall_x']:.2f} | "
                     f"{f['worst_gap']:+.4f} | {'yes' if f['lossless'] else 'no'} | {gaps} |")  # fmt: skip
    a = t["ablations"]
    lines += ["", f"## Options on {bench['ablation_member']}: searched vs manual, MoGrow, AdamW", ""]
    lines += ["| arm | options | loss | gap | MACs x | wall x |", "|---|---|---|---|---|---|"]
    lines.append(f"| baseline | - | {_loss(a['baseline'])} | - | 1 | 1 |")
    for arm in ("ap", *ABLATIONS):
        v = a[arm]["versus"]
        lines.append(f"| {arm} | `{json.dumps(results['arms'][arm])}` | {_loss(a[arm])} | {v['gap']:+.4f} | "
                     f"{v['macs_x']:.3f} | {v['wall_x']:.2f} |")  # fmt: skip
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(results: dict[str, Any], path: Path) -> Path:
    """Left: each member's loss against its training MACs, plain and AutoProg. Right: the families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = results["tables"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("baseline", "individual", "o"), ("ap", "AutoProg-One (searched)", "^")):
        xs = [r[key]["train_macs"] / 1e12 for r in t["members"].values()]
        ys = [r[key]["loss"]["mean"] for r in t["members"].values()]
        es = [r[key]["loss"]["std"] for r in t["members"].values()]
        left.errorbar(xs, ys, yerr=es, marker=marker, linestyle="-", capsize=3, label=label)
    manual = t["ablations"]["ap-manual"]  # the manual linear schedule, on the ablation member
    left.errorbar([manual["train_macs"] / 1e12], [manual["loss"]["mean"]], yerr=[manual["loss"]["std"]],
                  marker="s", capsize=3, linestyle="none", label="AutoProg-One (manual ramp)")  # fmt: skip
    for m, r in t["members"].items():
        left.annotate(m, (r["baseline"]["train_macs"] / 1e12, r["baseline"]["loss"]["mean"]), fontsize=8,
                      xytext=(4, -12), textcoords="offset points")  # fmt: skip
    left.set(xscale="log", xlabel="training MACs of the member (T)", ylabel="val_loss (test split)",
             title="one member, equal steps")  # fmt: skip
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=8)
    for i, (arm, f) in enumerate(t["family"].items()):
        gaps = [r["gap"] for r in f["members"].values()]
        right.scatter(f["train_macs"] / 1e12, max(gaps), s=40)
        right.annotate(f"{arm} ({f['macs_x']:.2f}x)", (f["train_macs"] / 1e12, max(gaps)), fontsize=8,
                       xytext=(4, 4 + 11 * (i % 2)), textcoords="offset points")  # fmt: skip
    right.axhline(0, color="grey", linewidth=0.8)
    right.set(xlabel="training MACs of the whole family (T)", ylabel="worst member's gap to its baseline",
              title="the family")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="micro", help="micro (the micro family) or FILE.py:FACTORY")
    p.add_argument("--out", default="benchmarks/results/autoprog", help="results folder (rerun to resume)")
    p.add_argument("--smoke", action="store_true", help="one seed, 2 members, short runs")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (1 torch thread each)")
    p.add_argument("--timing", action="store_true", help="only the back-to-back CPU timing (timing.json)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="override a bench field")
    args = p.parse_args(argv)
    bench = AutoProgBench() if args.bench == "micro" else load_bench(args.bench)
    changes = dict(SMOKE) if args.smoke else {}
    fields = {f.name for f in dataclasses.fields(bench)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"autoprog: unknown bench field {name!r}; fields: {', '.join(sorted(fields))}")
        v = json.loads(value)
        changes[name] = tuple(v) if isinstance(v, list) else v
    bench = dataclasses.replace(bench, **changes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        time_pairs(bench, out)
        return 0
    results = run(bench, out, args.workers)
    results["command"] = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/autoprog.py", *(argv if argv is not None else sys.argv[1:])]
    )
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {write_readme(results, out)} and {plot(results, out / 'autoprog.png')} "
          f"({results['wall_minutes']:.1f} min)")  # fmt: skip
    largest = bench.members[-1]
    v = results["tables"]["members"][largest]["versus"]
    chainap = results["tables"]["family"]["chainap"]["macs_x"]
    print(f"autoprog: member={largest} macs={v['macs_x']:.3f}x wall={v['wall_x']:.2f}x gap={v['gap']:+.4f} "
          f"lossless={'yes' if v['lossless'] else 'no'} chainap={chainap:.3f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
