"""AutoProg-One's depth half on a four-block bench-S (issue 15; docs/autoprog.md).

The bench family is one block deep, so on it AutoProg-One only grows the resolution, and MoGrow and
the AdamW hand-over (which act at a depth change) never run. Here bench-S is four blocks deep in both
towers (``benchmarks/bench_deep_family.yaml``), trained on the benchmark's protocol (data, batch, lr,
test split of docs/reproduce.md) for 8000 steps: individually, and with the manual AutoProg-One depth
ramp at full resolution (the resolution axis does not transfer on this data: docs/autoprog.md), with
MoGrow and AdamW carried (compt's default), without MoGrow, and with AdamW reset at every growth
(the official code); and the full member trained for the depth ramp's MACs (6070 steps). Seed 0.
From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/autoprog-bench/deep.py run    # resumable, 2 workers
    PYTHONPATH=src .venv/bin/python benchmarks/results/autoprog-bench/deep.py table  # -> deep.json
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, "benchmarks")
from autoprog_lib import MANUAL  # noqa: E402
from recipe_bench import IssueTwelveBench  # noqa: E402
from recipe_lib import Job, baseline_key, run_job  # noqa: E402
from reproduce_lib import Protocol, run_jobs  # noqa: E402

OUT, MEMBER, STEPS, SEED = Path("benchmarks/results/autoprog-bench/deep"), "bench-S4", 8000, 0
DEPTH = MANUAL | {"resolution": [3, 3, 3, 3]}  # the linear depth ramp, full resolution
ARMS = {
    "ap-depth": DEPTH,
    "ap-depth-plain": DEPTH | {"mogrow": False},
    "ap-depth-reset": DEPTH | {"optimizer_growth": "reset"},
}


@dataclass(frozen=True)
class DeepBench(IssueTwelveBench):
    """The issue-12 protocol on the four-block bench-S; nothing adopted from reproduce's runs."""

    name: str = "bench-deep"
    family: str = "benchmarks/bench_deep_family.yaml"
    members: tuple[str, ...] = (MEMBER,)
    baseline_dir: str = ""


BENCH = DeepBench()
BASE = baseline_key(MEMBER, STEPS, SEED)
# The baseline of the depth ramp's training MACs (8000 / 1.318 steps): is growing better than training
# the full member for fewer steps at the same cost?
EQUAL_COST = Job(baseline_key(MEMBER, 6070, SEED), MEMBER, 6070, SEED, arm="base-equal-macs")


def jobs() -> list[Job]:
    progressive = [Job(f"{a}_{MEMBER}_{STEPS}_s{SEED}", MEMBER, STEPS, SEED, arm=a,
                       options=(("progressive", o),)) for a, o in ARMS.items()]  # fmt: skip
    return [Job(BASE, MEMBER, STEPS, SEED), *progressive, EQUAL_COST]


def _run(_: Protocol, job: Job, out: str) -> dict:
    return run_job(BENCH, job, out)


def table() -> dict:
    """Per arm: test-split val_loss (and the validation split's), zero-shot top-1 per task, the gap
    to the baseline (nats, positive = worse), the exact training-MAC and the wall-time ratio to the
    baseline (wall: 2 jobs on 2 cores)."""
    runs = [(j, json.loads((OUT / "runs" / j.key / "result.json").read_text())) for j in jobs()]
    base = runs[0][1]
    out = {}
    for job, r in runs:
        test = r["metrics"]["test"]
        loss = test["val_loss"]
        out[job.arm or "base"] = {
            "val_loss": loss,
            "val_loss_val_split": r["metrics"]["val"]["val_loss"],
            "zeroshot": {t: test[f"zeroshot/{t}/top1"] for t in ("shape", "colour", "count", "binding")},
            "gap": loss - base["metrics"]["test"]["val_loss"],
            "macs_x": base["train_macs"] / r["train_macs"],
            "wall_x": base["wall_s"] / r["wall_s"],
            "train_macs": r["train_macs"],
            "wall_s": r["wall_s"],
        }
    return {"member": MEMBER, "steps": STEPS, "seed": SEED, "arms": ARMS, "rows": out}


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run_jobs(Protocol(), jobs(), str(OUT), workers=2, runner=_run)
    else:
        (OUT.parent / "deep.json").write_text(json.dumps(table(), indent=1))
        print(json.dumps(table(), indent=1))
