"""The 16000-step reference for bench-XS, S and M on 3 seeds (docs/reproduce.md, issue 12, criteria 1-2).

``reproduce.py`` trains every seed at ``reference_steps`` and seed 0 alone at the other sweep lengths;
this trains the two seeds it lacks at 16000 steps (seed 0's runs are stage B's) into the same
``runs/`` folder under the same protocol, then tabulates 8000 vs 16000 for every member and seed.
bench-L is not retrained: its 16000-step doubling moved it by 0.005 nats. From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/reference16k.py run bench-M,bench-S,bench-XS 1
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/reference16k.py run bench-M,bench-S,bench-XS 2
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/reference16k.py table   # -> reference16k.json

(the two ``run`` lines ran side by side, one process each, on the 2 cores.) The 32000-step doubling
of seed 0 for the two members still moving most at 16000 (criterion 2; next sitting, one process each)::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/reference16k.py run bench-S 0 32000
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/reference16k.py run bench-XS 0 32000
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from reproduce_lib import Job, Protocol, baseline_key, mean_std, run_jobs  # noqa: E402

OUT = Path("benchmarks/results/bench")
MEMBERS, SEEDS, STEPS = ("bench-XS", "bench-S", "bench-M", "bench-L"), (0, 1, 2), (8000, 16000, 32000)


def run(members: list[str], seed: int, steps: int = 16000) -> None:
    jobs = [Job(baseline_key(m, steps, seed), m, steps, seed) for m in members]
    run_jobs(Protocol(), jobs, str(OUT), workers=1)


def table() -> dict:
    """Per member and schedule: each seed's test-split val_loss, mean and std; the doubling and the
    adjacent gaps in seed std at each member's longest schedule with 3 seeds."""
    rows: dict = {}
    for m in MEMBERS:
        for steps in STEPS:
            found = {s: OUT / "runs" / baseline_key(m, steps, s) / "result.json" for s in SEEDS}
            vals = {
                s: json.loads(p.read_text())["metrics"]["val_loss"] for s, p in found.items() if p.is_file()
            }
            if vals:  # a schedule not run for this member has no row
                mean, std = mean_std(list(vals.values()))  # std 0 for one seed
                rows[f"{m}@{steps}"] = {"seeds": vals, "mean": mean, "std": std}
    three = {key for key, r in rows.items() if len(r["seeds"]) == 3}
    ref = {m: max(s for s in STEPS if f"{m}@{s}" in three) for m in MEMBERS}
    gaps = {}
    for small, large in zip(MEMBERS, MEMBERS[1:], strict=False):
        a, b = rows[f"{small}@{ref[small]}"], rows[f"{large}@{ref[large]}"]
        gaps[f"{small}->{large}"] = {
            "gap": a["mean"] - b["mean"],
            "in_std": (a["mean"] - b["mean"]) / max(a["std"], b["std"]),
        }
    return {"rows": rows, "reference": ref, "adjacent_gaps": gaps}


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2].split(","), *map(int, sys.argv[3:5]))
    else:
        result = table()
        (OUT / "reference16k.json").write_text(json.dumps(result, indent=1))
        for key, r in result["rows"].items():
            seeds = " / ".join(f"{r['seeds'][s]:.3f}" if s in r["seeds"] else "-" for s in SEEDS)
            spread = f" ± {r['std']:.3f}" if len(r["seeds"]) > 1 else ""
            print(f"{key}: {seeds}  mean {r['mean']:.3f}{spread}")
        for key, g in result["adjacent_gaps"].items():
            print(f"{key}: {g['gap']:.3f} nats = {g['in_std']:.1f} seed std")
