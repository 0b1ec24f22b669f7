"""The deep bench family's baselines (issue 12, criteria 1-2; docs/reproduce.md "The deep family").

``benchmarks/bench_deep_family.yaml`` keeps bench-XS and bench-S and replaces bench-M / bench-L by
bench-S4 / bench-M4 (the same widths four blocks deep). Its upper members are trained here on the
benchmark's protocol (data, batch, lr; both splits, `recipe_bench.IssueTwelveBench`); bench-XS and
bench-S are the one-block family's, whose runs are in ``reference16k.json``. From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-deep/family.py run bench-M4@8000@0 ...
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-deep/family.py table   # -> family.json

``run`` trains the given ``member@steps@seed`` baselines in that order on 2 workers (resumable).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, "benchmarks")
from recipe_bench import IssueTwelveBench  # noqa: E402
from recipe_lib import Job, baseline_key, run_job  # noqa: E402
from reproduce_lib import Protocol, mean_std, run_jobs  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
ONE_BLOCK = HERE.parent / "bench" / "reference16k.json"  # bench-XS / bench-S: the one-block family's runs
MEMBERS = ("bench-XS", "bench-S", "bench-S4", "bench-M4")


@dataclass(frozen=True)
class DeepFamilyBench(IssueTwelveBench):
    """The issue-12 protocol on the deep family; nothing adopted from reproduce's runs."""

    name: str = "bench-deep"
    family: str = "benchmarks/bench_deep_family.yaml"
    members: tuple[str, ...] = MEMBERS
    baseline_dir: str = ""


BENCH = DeepFamilyBench()


def parse(spec: str) -> Job:
    member, steps, seed = spec.split("@")
    if member not in MEMBERS:
        raise SystemExit(f"unknown member {member!r} in {spec!r}: one of {', '.join(MEMBERS)}")
    return Job(baseline_key(member, int(steps), int(seed)), member, int(steps), int(seed))


def _run(_: Protocol, job: Job, out: str) -> dict:
    return run_job(BENCH, job, out)


def table() -> dict:
    """Per member and schedule: each seed's val_loss on both splits with mean and std (bench-XS and
    bench-S: the one-block family's test split), and the doubling of each member's seed-0 schedules."""
    rows: dict = {}
    for key, r in json.loads(ONE_BLOCK.read_text())["rows"].items():
        if key.split("@")[0] in MEMBERS:
            rows[key] = {"test": r, "source": "bench/reference16k.json"}
    for done in sorted((OUT / "runs").glob("*/result.json")):
        r = json.loads(done.read_text())
        job = r["job"]
        empty = {"test": {"seeds": {}}, "val": {"seeds": {}}}
        row = rows.setdefault(f"{job['member']}@{job['steps']}", empty)
        for split in ("test", "val"):
            row[split]["seeds"][str(job["seed"])] = r["metrics"][split]["val_loss"]
        row.setdefault("wall_s", {})[str(job["seed"])] = r["wall_s"]
    for row in rows.values():
        for split in ("test", "val"):
            if split in row and "source" not in row:
                row[split]["mean"], row[split]["std"] = mean_std(list(row[split]["seeds"].values()))
    return {"family": BENCH.family, "metric": "val_loss (nats, lower is better)", "rows": rows}


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run_jobs(Protocol(), [parse(s) for s in sys.argv[2:]], str(OUT), workers=2, runner=_run)
    else:
        (HERE / "family.json").write_text(json.dumps(table(), indent=1) + "\n")
        print(json.dumps(table(), indent=1))
