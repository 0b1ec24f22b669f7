"""AutoProg-One's depth half on a four-block bench-S (issue 15; docs/autoprog.md).

The bench family is one block deep, so on it AutoProg-One only grows the resolution, and MoGrow and
the AdamW hand-over (which act at a depth change) never run. Here bench-S is four blocks deep in both
towers (``benchmarks/bench_deep_family.yaml``), trained on the benchmark's protocol (data, batch, lr,
test split of docs/reproduce.md) for 8000 steps: individually, and with the manual AutoProg-One depth
ramp at full resolution (the resolution axis does not transfer on this data: docs/autoprog.md), with
MoGrow and AdamW carried (compt's default), without MoGrow, and with AdamW reset at every growth
(the official code); AutoProg-One's searched schedule (depth and resolution, seeds 1-2); and the full
member trained for the depth ramp's MACs (6070 steps). Seeds 0-2.
From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/autoprog-bench/deep.py run 1 2  # seeds, 2 workers
    PYTHONPATH=src .venv/bin/python benchmarks/results/autoprog-bench/deep.py table    # -> deep.json

The runs are not committed. ``table`` reads the finished runs in ``deep/runs`` and keeps, for a seed
with no runs here, the rows ``deep.json`` already records (seed 0 was trained in another sitting).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from autoprog_lib import MANUAL, SEARCH  # noqa: E402
from recipe_bench import IssueTwelveBench  # noqa: E402
from recipe_lib import Job, baseline_key, run_job  # noqa: E402
from reproduce_lib import Protocol, mean_std, run_jobs  # noqa: E402

from compt.report.figures import Curve, CurvePanel, plot_curve_panels  # noqa: E402

OUT, MEMBER, STEPS = Path(__file__).resolve().parent / "deep", "bench-S4", 8000
RECORD = OUT.parent / "deep.json"
FAMILY_RECORD = OUT.parent.parent / "bench-deep" / "family.json"  # bench-S4 alone at 4000 / 16000 steps
DEPTH = MANUAL | {"resolution": [3, 3, 3, 3]}  # the linear depth ramp, full resolution
ARMS = {
    "ap-depth": DEPTH,
    "ap-depth-plain": DEPTH | {"mogrow": False},
    "ap-depth-reset": DEPTH | {"optimizer_growth": "reset"},
    # AutoProg-One's default, the one-shot search over depth and resolution at each growth: the only
    # member of the benchmark where the search has depth to choose (seeds 1-2, docs/autoprog.md)
    "ap-searched": SEARCH,
}


@dataclass(frozen=True)
class DeepBench(IssueTwelveBench):
    """The issue-12 protocol on the four-block bench-S; nothing adopted from reproduce's runs."""

    name: str = "bench-deep"
    family: str = "benchmarks/bench_deep_family.yaml"
    members: tuple[str, ...] = (MEMBER,)
    baseline_dir: str = ""


BENCH = DeepBench()
# The baseline of the depth ramp's training MACs (8000 / 1.318 steps): is growing better than training
# the full member for fewer steps at the same cost?
EQUAL_COST_STEPS = 6070


def jobs(seed: int) -> list[Job]:
    """One seed's runs, the baseline first (the table's gaps are to it)."""
    progressive = [Job(f"{a}_{MEMBER}_{STEPS}_s{seed}", MEMBER, STEPS, seed, arm=a,
                       options=(("progressive", o),)) for a, o in ARMS.items()]  # fmt: skip
    equal_cost = Job(baseline_key(MEMBER, EQUAL_COST_STEPS, seed), MEMBER, EQUAL_COST_STEPS, seed,
                     arm="base-equal-macs")  # fmt: skip
    return [Job(baseline_key(MEMBER, STEPS, seed), MEMBER, STEPS, seed), *progressive, equal_cost]


def _run(_: Protocol, job: Job, out: str) -> dict:
    return run_job(BENCH, job, out)


def _row(r: dict, base: dict) -> dict:
    test = r["metrics"]["test"]
    return {
        "val_loss": test["val_loss"],
        "val_loss_val_split": r["metrics"]["val"]["val_loss"],
        "zeroshot": {t: test[f"zeroshot/{t}/top1"] for t in ("shape", "colour", "count", "binding")},
        "gap": test["val_loss"] - base["metrics"]["test"]["val_loss"],
        "macs_x": base["train_macs"] / r["train_macs"],
        "wall_x": base["wall_s"] / r["wall_s"],
        "train_macs": r["train_macs"],
        "wall_s": r["wall_s"],
    }


def _spread(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def table(record: Path = RECORD, runs: Path = OUT / "runs") -> dict:
    """Per seed and arm: test-split val_loss (and the validation split's), zero-shot top-1 per task,
    the gap to the seed's baseline (nats, positive = worse), the exact training-MAC and the wall-time
    ratio to it (wall: 2 jobs on 2 cores); then per arm the mean and seed std of the loss and the gap,
    and each arm's per-seed difference to the equal-MAC baseline (positive = the arm is worse)."""
    per_seed = json.loads(record.read_text())["seeds"] if record.exists() else {}
    for done_base in sorted(runs.glob(f"base_{MEMBER}_{STEPS}_s*/result.json")):
        seed = int(done_base.parent.name.rpartition("_s")[2])
        done = [(j, runs / j.key / "result.json") for j in jobs(seed)]
        done = [(j, json.loads(p.read_text())) for j, p in done if p.is_file()]
        per_seed[str(seed)] = {j.arm or "base": _row(r, done[0][1]) for j, r in done}
    per_seed = dict(sorted(per_seed.items(), key=lambda kv: int(kv[0])))
    summary = {}
    for arm in ["base", *ARMS, "base-equal-macs"]:
        rows = {s: rs[arm] for s, rs in per_seed.items() if arm in rs}
        if not rows:
            continue
        # against the full member trained for the same MACs: only an arm that costs what it cost
        equal = {s: per_seed[s]["base-equal-macs"] for s in rows if "base-equal-macs" in per_seed[s]}
        same_cost = [s for s in equal if abs(rows[s]["macs_x"] / equal[s]["macs_x"] - 1) < 0.01]
        vs_equal = {s: rows[s]["val_loss"] - equal[s]["val_loss"] for s in same_cost}
        summary[arm] = {
            "seeds": sorted(rows, key=int),
            **{k: _spread([r[k] for r in rows.values()]) for k in ("val_loss", "val_loss_val_split", "gap")},
            "minus_equal_macs": vs_equal,
            "macs_x": min(r["macs_x"] for r in rows.values()),
        }
    head = {"member": MEMBER, "steps": STEPS, "metric": "val_loss (nats, lower is better)", "arms": ARMS}
    return head | {"summary": summary, "seeds": per_seed}


LABELS = {
    "ap-depth": "depth ramp, MoGrow, AdamW carried (default)",
    "ap-depth-plain": "depth ramp without MoGrow",
    "ap-depth-reset": "depth ramp, AdamW reset (official)",
    "ap-searched": "searched schedule (AutoProg-One's default)",
}


def plot(result: dict, path: Path) -> Path:
    """Left: test val_loss against training MACs, bench-S4 alone at each schedule (6070 and 8000 steps
    from these runs, 4000 and 16000 from the deep family's ``family.json``) and the depth ramp's arms;
    error bars are the seed std of a point with several seeds, and a ramp below the dashed line beats
    training the full member for the same MACs. Right: each seed's ramp minus that seed's equal-MAC
    baseline. The seed spread (0.02-0.06 nats) hides the arms on the left; paired by seed, MoGrow's
    effect (the same data order and initialization on both sides) shows."""
    family = json.loads(FAMILY_RECORD.read_text())
    step_macs = family["step_train_macs"][MEMBER]
    alone = {
        int(k.split("@")[1]): (r["test"]["mean"], r["test"]["std"])
        for k, r in family["rows"].items()
        if k.startswith(f"{MEMBER}@") and int(k.split("@")[1]) >= 4000
    }
    summary = result["summary"]
    for arm, steps in (("base", STEPS), ("base-equal-macs", EQUAL_COST_STEPS)):
        if arm in summary:
            alone[steps] = (summary[arm]["val_loss"]["mean"], summary[arm]["val_loss"]["std"])
    label = f"{MEMBER} alone (4000 ... 16000 steps)"
    curves = [Curve(label, [(n * step_macs / 1e12, m) for n, (m, _) in sorted(alone.items())], 7, True)]
    curves += [
        Curve(label, [(n * step_macs / 1e12, m)], 7, True, spread=[sd]) for n, (m, sd) in alone.items()
    ]
    paired = [Curve(f"{MEMBER} alone, same MACs", [(int(s), 0.0) for s in result["seeds"]], 7, True)]
    for color, arm in enumerate(ARMS):
        if arm not in summary:
            continue
        row = summary[arm]
        macs = STEPS * step_macs / row["macs_x"] / 1e12
        curves.append(
            Curve(LABELS[arm], [(macs, row["val_loss"]["mean"])], color, spread=[row["val_loss"]["std"]])
        )
        if not row["minus_equal_macs"]:
            continue  # not at the equal-MAC baseline's cost (the search: 1.12x, not the ramp's 1.32x)
        diffs = sorted((int(s), d) for s, d in row["minus_equal_macs"].items())
        paired.append(Curve(LABELS[arm], diffs, color))
    seeds = len(result["seeds"])
    title = f"AutoProg-One's depth ramp on {MEMBER} ({seeds} seed{'s' * (seeds > 1)})"
    panels = [
        CurvePanel(title, "test val_loss (nats, lower is better)", curves),
        CurvePanel(
            "per seed: the ramp minus the full member at equal MACs",
            "nats (below 0: the ramp wins)",
            paired,
            xlabel="seed",
        ),
    ]
    return plot_curve_panels(panels, path, xlabel="training MACs (x 1e12)", band_label="seed std")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        # The baseline, the default ramp and the equal-cost baseline of every seed before the two
        # single-option arms, so that an interrupted sitting leaves the main comparison complete.
        per_seed = [jobs(int(s)) for s in sys.argv[2:] or ["0"]]
        order = [j for js in per_seed for j in js if j.arm in ("", "ap-depth", "base-equal-macs")]
        order += [j for js in per_seed for j in js if j not in order]
        run_jobs(Protocol(), order, str(OUT), workers=2, runner=_run)
    else:
        text = json.dumps(table(), indent=1)
        RECORD.write_text(text + "\n")
        print(text)
        print(plot(json.loads(text), OUT.parent / "deep.png"))
