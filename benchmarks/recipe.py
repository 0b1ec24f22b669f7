"""Which chain recipe pays? Each option of issue 13 against the paper's recipe, on a given benchmark.

Run from the repository root::

    .venv/bin/python benchmarks/recipe.py --bench micro --out benchmarks/results/recipe   # 3 seeds
    .venv/bin/python benchmarks/recipe.py --smoke --out /tmp/recipe-smoke   # 1 seed, 2 members: a smoke run
    .venv/bin/python benchmarks/recipe.py --bench path/to/bench_lib.py:recipe_bench --out ...  # another bench
    .venv/bin/python benchmarks/recipe.py --out ... --set seeds='[0,1]' arms='["paper","msg"]'

The protocol:

1. Baselines: every member of the benchmark's chain, trained individually for its baseline schedule,
   on every seed.
2. Arms (``recipe_lib.ARMS``): for every arm and seed, the chain's links, each grown from the previous
   one (the first from the first member's baseline of that seed) and trained for ``link_fraction`` of
   the baseline schedule with the arm's overrides. Every arm has the same link lengths and seeds.
3. Choice on the **validation** split: per group (alpha, schedule, growth, optimizer) the arm with the
   highest mean gap to the baselines; the groups whose winner beats the paper's recipe are combined
   into the arm ``best``, which is trained too (``combine``).
4. Report on the **test** split, never used for a choice: per arm and member the metric (mean and
   std over seeds), the gap to the baseline, lossless (gap <= max(tolerance, 2 x the baseline's std)),
   individual and accumulated training-MAC and wall-clock acceleration.

Results: ``<out>/results.json`` (every run, the choice, every table) and ``<out>/README.md``. Rerunning
the same command skips finished runs. The last line printed is
``recipe: best=<arms> acceleration=<x>x worst_gap=<gap> lossless=<yes|no>`` (the gap in the
metric's units, positive when the chain is worse).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_lib import (  # noqa: E402
    ARMS,
    BENCHES,
    BEST,
    Bench,
    arm_table,
    baseline_jobs,
    chain_jobs,
    choose,
    run_job,
)
from reproduce_lib import run_jobs  # noqa: E402

# A smoke run of every option: one seed, a 2-member link of a few hundred steps (not a measurement).
SMOKE = dict(members=("micro-XS", "micro-S"), seeds=(0,), baseline_steps=300, link_fraction=0.5)


def load_bench(spec: str) -> Bench:
    """``micro`` (a registered benchmark) or ``path/to/module.py:factory`` (a function returning a Bench)."""
    if spec in BENCHES:
        return BENCHES[spec]()
    path, _, factory = spec.partition(":")
    if not factory or not Path(path).is_file():
        raise SystemExit(f"recipe: --bench {spec!r} is neither {', '.join(BENCHES)} nor FILE.py:FACTORY")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # so worker processes can unpickle its Bench
    module_spec.loader.exec_module(module)
    return getattr(module, factory)()


def run(bench: Bench, out: Path, workers: int, log=print) -> dict[str, Any]:
    """Train every run of the protocol (resumably) and build the comparison; returns results.json."""
    start = time.perf_counter()
    unknown = [a for a in bench.arms if a not in ARMS]
    if unknown or "paper" not in bench.arms:
        raise SystemExit(f"recipe: arms must include 'paper' and come from {', '.join(ARMS)}; got {unknown}")
    jobs = baseline_jobs(bench)
    for arm in bench.arms:
        jobs += chain_jobs(bench, arm, ARMS[arm][1])
    log(f"phase 1: {len(jobs)} runs (baselines and {len(bench.arms)} arms)")
    runs = run_jobs(bench, jobs, str(out), workers, log=log, runner=run_job)
    choice = choose(bench, runs, list(bench.arms))
    arms = list(bench.arms)
    same = [a for a in arms if ARMS[a][1] == choice["best_options"]]
    if bench.combine and not same:
        log(f"phase 2: the combination {choice['best_options']}")
        runs |= run_jobs(
            bench, chain_jobs(bench, BEST, choice["best_options"]), str(out), workers, log=log, runner=run_job
        )
        arms.append(BEST)
    choice["best_arm"] = same[0] if same else (BEST if bench.combine else "paper")
    return {
        "bench": bench.to_dict(),
        "choice": choice,
        "tables": {arm: arm_table(bench, runs, arm, "test") for arm in arms},
        # On validation only where every baseline was scored there (an adopted one may not have been).
        "val_tables": {arm: arm_table(bench, runs, arm, "val") for arm in arms}
        if all("val" in runs[j.key]["metrics"] for j in baseline_jobs(bench))
        else {},
        "runs": runs,
        "wall_minutes": (time.perf_counter() - start) / 60,
    }


def write_readme(results: dict[str, Any], folder: Path) -> Path:
    """The comparison as Markdown: the choice on validation, then every arm on test."""
    bench, choice = results["bench"], results["choice"]
    lines = [
        f"# Chain recipes on `{bench['name']}` (issue 13)",
        "",
        f"Command: `{results.get('command', '')}`; {results['wall_minutes']:.1f} min.",
        f"Chain {' -> '.join(bench['members'])}, baselines {bench['baseline_steps']} steps, links "
        f"{bench['link_fraction']:g} of that, seeds {list(bench['seeds'])}; metric `{bench['metric']}`.",
        "",
        "## Choice (validation split)",
        "",
        "| arm | group | options | mean gain over the paper's chain (val, higher is better) |",
        "|---|---|---|---|",
    ]
    score_digits = 2 if bench.get("higher_is_better", True) else 4  # points, or nats for a loss
    for arm, score in choice["val_scores"].items():
        lines.append(f"| {arm} | {ARMS[arm][0]} | `{json.dumps(ARMS[arm][1])}` | {score:+.{score_digits}f} |")
    lines += ["", f"Group winners: {choice['group_winners']}; best: `{choice['best_options']}`", ""]
    lines += ["## Every arm (test split)", ""]
    head = "| arm | member | baseline | chain | gap | tol. | lossless | MACs x indiv. | MACs x accum. |"
    lines += [head + " wall x accum. |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    d = 1 if bench.get("higher_is_better", True) else 3  # points, or nats for a loss
    for arm, table in results["tables"].items():
        for m, r in table["members"].items():
            if r.get("first_member"):
                continue
            lines.append(
                f"| {arm} | {m} | {r['baseline']:.{d}f} ± {r['baseline_std']:.{d}f} | {r['chain']:.{d}f} ± "
                f"{r['chain_std']:.{d}f} | {r['gap']:.{d + 1}f} | {r['tolerance']:.{d + 1}f} | "
                f"{'yes' if r['lossless'] else 'no'} | {r['macs_x_individual']:.2f} | "
                f"{r['macs_x_accumulated']:.2f} | {r['wall_x_accumulated']:.2f} |"
            )
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="micro", help=f"{', '.join(BENCHES)} or FILE.py:FACTORY")
    p.add_argument("--out", default="benchmarks/results/recipe", help="results folder (rerun to resume)")
    p.add_argument("--smoke", action="store_true", help="one seed, 2 members, a few hundred steps")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (1 torch thread each)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="override a Bench field")
    args = p.parse_args(argv)
    bench = load_bench(args.bench)
    changes = dict(SMOKE) if args.smoke else {}
    fields = {f.name for f in dataclasses.fields(bench)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"recipe: unknown bench field {name!r}; fields: {', '.join(sorted(fields))}")
        v = json.loads(value)
        changes[name] = tuple(v) if isinstance(v, list) else v
    bench = dataclasses.replace(bench, **changes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(bench, out, args.workers)
    results["command"] = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/recipe.py", *(argv or sys.argv[1:])]
    )
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {write_readme(results, out)} ({results['wall_minutes']:.1f} min)")
    best = results["choice"]["best_arm"]
    s = results["tables"][best]["summary"]
    print(
        f"recipe: best={best} acceleration={s['accumulated_macs_x']:.2f}x "
        f"worst_gap={s['worst_gap']:.{2 if bench.higher_is_better else 3}f} "
        f"lossless={'yes' if s['lossless'] else 'no'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
