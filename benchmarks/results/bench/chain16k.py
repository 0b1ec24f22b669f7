"""The chain against the 16000-step reference (docs/reproduce.md, issues 12-13), and equal-step baselines.

bench-XS -> S -> M, every link 1/4 of the reference (4000 steps), grown from the 16000-step bench-XS
of the same seed, with the paper's recipe (insert / duplicate, IFD alpha 500) and with the gated IFD
(the recipe harness's best arm at the 8000-step reference). Beside them the 4000-step baselines of
bench-S and M: the same steps as a link, started from scratch, so the table says how many baseline
steps a link's inheritance is worth. The 16000-step baselines are reference16k.py's (its JSON); the
bench-XS teachers are retrained here under the same keys (their weights are not committed), which
also says how far CPU training here moves from reference16k.json. Two recipe arms at 1/4 (alpha 0 and
SALT's early switch-off, ``OPTION_ARMS``) are trained by the recipe harness's runner. From the repository
root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/chain16k.py run     # resumable, 2 workers
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/chain16k.py run 2 alpha0@4000 salt-step@4000
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/chain16k.py table   # -> chain16k.json
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/chain16k.py table xeon  # -> chain16k-xeon.json

``run 2 ARM@STEPS|KEY ...`` trains only those links or runs (and the teachers they need). The table
merges runs/ (not committed) into the committed table it writes, so a fresh checkout adds to it. CPU
runs are bitwise equal on one machine type only, and the teachers are retrained in every checkout, so
a sitting on another machine type writes its own table (``table NAME`` -> ``chain16k-NAME.json``):
the seeds of one arm never mix teachers trained on two machines.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from recipe_bench import IssueTwelveBench  # noqa: E402
from recipe_lib import ARMS as RECIPE_ARMS  # noqa: E402
from recipe_lib import Job as RecipeJob  # noqa: E402
from recipe_lib import run_job as run_recipe_job  # noqa: E402
from reproduce_lib import Job, Protocol, baseline_key, mean_std, run_job, run_jobs  # noqa: E402

OUT = Path("benchmarks/results/bench")
FIRST, LINKS, SEEDS = "bench-XS", ("bench-S", "bench-M"), (0, 1, 2)
REFERENCE, LINK = 16000, 4000  # links at 1/4 of the reference; the 4000-step baselines
# (arm, link steps) -> TrainConfig.distill_gate; the 8000-step links (1/2) locate where lossless starts
ARMS = {("paper", 4000): False, ("gate", 4000): True, ("paper", 8000): False}
# The 16000- and 8000-step baselines are reference16k.json's, trained on another machine; one of them
# retrained here says how far this machine's runs move from it (with the bench-XS teachers).
RERUN = Job(baseline_key("bench-S", 8000, 0), "bench-S", 8000, 0)
# Recipe arms (benchmarks/recipe_lib.py) on the 1/4 links, trained by the recipe harness's runner (its
# TrainConfig overrides; scored on both splits, the test split being reproduce's): the alpha and the
# schedule group winners of the 8000-step screen (benchmarks/results/recipe-bench/screen-seed0.md),
# since here the second link's teacher is worse than a bench-M trained alone for the link's steps.
OPTION_ARMS = ("alpha0", "salt-step")
ARM_STEPS = [*ARMS, *((arm, LINK) for arm in OPTION_ARMS)]
BENCH = IssueTwelveBench(baseline_steps=REFERENCE)
COSTS = ("train_macs", "wall_s")


def link_prefix(arm: str, steps: int) -> str:
    return f"chain16k-{arm}_f{steps / REFERENCE:g}_".replace(".", "p")


def link_key(arm: str, steps: int, member: str, seed: int) -> str:
    return f"{link_prefix(arm, steps)}{member}_s{seed}"


def jobs() -> list[Job]:
    """In the order the pool starts ready jobs (the order of priority on 2 cores): the teachers,
    the paper's links at 1/4, the equal-step baselines, the rerun, the other arms' links at 1/4
    (gated, then ``OPTION_ARMS``), the paper's links at 1/2."""
    teachers = [Job(baseline_key(FIRST, REFERENCE, s), FIRST, REFERENCE, s) for s in SEEDS]
    links = []
    for (arm, steps), gate in ARMS.items():
        for s in SEEDS:
            teacher = baseline_key(FIRST, REFERENCE, s)
            for m in LINKS:
                key = link_key(arm, steps, m, s)
                links.append(Job(key, m, steps, s, teacher=teacher, distill_gate=gate))
                teacher = key
    short = [Job(baseline_key(m, LINK, s), m, LINK, s) for s in SEEDS for m in LINKS]
    quarter = [j for j in links if j.steps == LINK and not j.distill_gate]
    gated = [j for j in links if j.steps == LINK and j.distill_gate]
    half = [j for j in links if j.steps != LINK]
    return teachers + quarter + short + [RERUN] + gated + option_jobs() + half


def option_jobs() -> list[RecipeJob]:
    """The 1/4 links of every recipe arm in ``OPTION_ARMS``, grown from the same teachers."""
    jobs = []
    for arm in OPTION_ARMS:
        options = tuple(sorted(RECIPE_ARMS[arm][1].items()))
        for s in SEEDS:
            teacher = baseline_key(FIRST, REFERENCE, s)
            for m in LINKS:
                key = link_key(arm, LINK, m, s)
                jobs.append(RecipeJob(key, m, LINK, s, teacher, arm, options, deps=(teacher,)))
                teacher = key
    return jobs


def _run(proto: Protocol, job: Job | RecipeJob, out: str) -> dict:
    return run_recipe_job(BENCH, job, out) if isinstance(job, RecipeJob) else run_job(proto, job, out)


def _record(key: str) -> dict | None:
    """A finished run's record, its ``metrics`` those of the test split (a recipe run has both)."""
    path = OUT / "runs" / key / "result.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    record["metrics"] = record["metrics"].get("test", record["metrics"])
    return record


def table(path: Path) -> dict:
    """Per member: the baselines at 4000, 8000 and 16000 steps (test-split val_loss per seed, mean,
    std; 8000 and 16000 from reference16k.json) and each arm's links, with the gap to the 16000-step
    reference, the lossless verdict, the gap to the baseline of the same steps, and the chain's
    accumulated training-MAC acceleration (the engine's exact counts; a link's includes its teacher's
    forward). A run whose record is not in runs/ (runs/ is not committed: trained in another checkout)
    keeps the value it had in the committed table at ``path``."""
    ref = json.loads((OUT / "reference16k.json").read_text())["rows"]
    kept = json.loads(path.read_text()) if path.is_file() else {}

    def row(keys: dict[int, str], name: tuple[str, str]) -> dict:
        values = kept.get("members", {}).get(name[0], {}).get(name[1], {}).get("seeds", {})
        values = {int(s): v for s, v in values.items()}
        for s, k in keys.items():
            if r := _record(k):
                values[s] = r["metrics"]["val_loss"]
        values = dict(sorted(values.items()))
        if not values:  # not run (yet)
            return {}
        mean, std = mean_std(list(values.values()))
        return {"seeds": values, "mean": mean, "std": std}

    out: dict = {"rerun_check": dict(kept.get("rerun_check", {})), "members": {}}
    for cost in COSTS:
        name = f"accumulated_acceleration_{cost}"
        out[name] = dict(kept.get(name, {}))
    reruns = [(FIRST, REFERENCE, s) for s in SEEDS] + [(RERUN.member, RERUN.steps, RERUN.seed)]
    for m, steps, s in reruns:  # runs retrained here against reference16k.json's
        r = _record(baseline_key(m, steps, s))
        if r:
            then = ref[f"{m}@{steps}"]["seeds"][str(s)]
            out["rerun_check"][baseline_key(m, steps, s)] = {
                "here": r["metrics"]["val_loss"],
                "reference16k": then,
            }
    for m in LINKS:
        base = {
            LINK: row({s: baseline_key(m, LINK, s) for s in SEEDS}, (m, f"baseline@{LINK}")),
            8000: ref[f"{m}@8000"],
            REFERENCE: ref[f"{m}@{REFERENCE}"],
        }
        entry = {f"baseline@{steps}": b for steps, b in base.items()}
        tolerance = max(Protocol().loss_tolerance, 2 * base[REFERENCE]["std"])
        for arm, steps in ARM_STEPS:
            link = row({s: link_key(arm, steps, m, s) for s in SEEDS}, (m, f"{arm}@{steps}"))
            if link:
                link["gap_to_reference"] = link["mean"] - base[REFERENCE]["mean"]
                link["tolerance"] = tolerance
                link["lossless"] = link["gap_to_reference"] <= tolerance
                if base[steps]:  # against a baseline trained for the link's own steps
                    link["gap_to_equal_steps"] = link["mean"] - base[steps]["mean"]
                entry[f"{arm}@{steps}"] = link
        out["members"][m] = entry
    # the family trained individually at the reference vs the chain: the first member at the
    # reference, then each link as measured, seed 0. MACs are exact and seed-free; wall seconds are
    # this machine's with 2 jobs on its 2 cores (the 16000-step S / M baselines were trained on
    # another machine, so their wall time is 4x that of the 4000-step runs here)
    # the seed-0 costs behind it, kept in the table so that a later checkout can add an arm to it
    out["seed0_cost"] = costs = dict(kept.get("seed0_cost", {}))
    for key in [baseline_key(FIRST, REFERENCE, 0), *(baseline_key(m, LINK, 0) for m in LINKS)] + [
        link_key(arm, steps, m, 0) for arm, steps in ARM_STEPS for m in LINKS
    ]:
        if r := _record(key):
            costs[key] = {c: r[c] for c in (*COSTS, "steps")}
    first = costs.get(baseline_key(FIRST, REFERENCE, 0))
    per_step = [costs.get(baseline_key(m, LINK, 0)) for m in LINKS]
    if first and all(per_step):
        for cost in COSTS:
            individual = first[cost] + sum(REFERENCE * r[cost] / r["steps"] for r in per_step)
            for arm, steps in ARM_STEPS:
                links = [costs.get(link_key(arm, steps, m, 0)) for m in LINKS]
                if all(links):
                    chain = first[cost] + sum(r[cost] for r in links)
                    out[f"accumulated_acceleration_{cost}"][f"{arm}@{steps}"] = individual / chain
    return out


def selected(arms: list[str]) -> list[Job | RecipeJob]:
    """The jobs ``arms`` names (an arm's links as ``arm@steps``, e.g. ``alpha0@4000``, or one job by its
    key) and what they need, in :func:`jobs`' order; every job when ``arms`` is empty."""
    every = jobs()
    if not arms:
        return every
    by_key, keep = {j.key: j for j in every}, set()
    prefixes = tuple(link_prefix(*_arm(a)) if "@" in a else a for a in arms)
    wanted = [j for j in every if j.key.startswith(prefixes)]
    while wanted:
        job = wanted.pop()
        keep.add(job.key)
        wanted += [by_key[d] for d in job.deps if d in by_key and d not in keep]
    return [j for j in every if j.key in keep]


def _arm(text: str) -> tuple[str, int]:
    arm, steps = text.split("@")
    return arm, int(steps)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
        run_jobs(Protocol(), selected(sys.argv[3:]), str(OUT), workers=workers, runner=_run)
    else:
        path = OUT / (f"chain16k-{sys.argv[2]}.json" if len(sys.argv) > 2 else "chain16k.json")
        result = table(path)
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
