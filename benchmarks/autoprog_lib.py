"""The runs and tables behind ``benchmarks/autoprog.py`` (issue 15): AutoProg-One against individual training,
in a chain, and its own options, on the micro benchmark.

Every run is one engine call (:func:`compt.engine.train.train_member`, through ``recipe_lib.run_job``),
scored by the held-out validation loss (``val_loss``, issue 12: 2,048 scenes, M = 4, batch 256) on two
splits of held-out scenes: seed 1 (``val``) and seed 0 (``test``). Nothing here is chosen: every arm
is AutoProg-One's defaults (:class:`compt.engine.progressive.ProgressiveConfig`) or one declared
change of them, so the tables report the test split and keep the validation split for the record.

- ``base``: every member trained individually, ``baseline_steps``, plain (recipe_lib's baselines);
- ``ap``: every member trained individually with AutoProg-One (searched schedule), same steps;
- ``chain``: the paper's chain (links of ``link_fraction`` of the baseline steps, grown from the
  first member's baseline); ``chainap``: the same chain with AutoProg-One on the first member (``ap``'s
  run) and on every link; the AutoProg-only family is the ``ap`` runs;
- ablations on ``ablation_member``: the manual linear schedule with MoGrow and AdamW carried
  (``ap-manual``), then without MoGrow (``ap-manual-plain``) or with AdamW reset (``ap-manual-reset``),
  and the manual schedule of the lowest resolution until the last stage (``ap-manual-lowres``: what
  the searches chose on this benchmark, added after the first full run to tell the schedule's effect
  from the search's).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import recipe_lib
from recipe_lib import Job, MicroBench, baseline_key
from reproduce_lib import BENCH_SPEC

SPLITS = recipe_lib.SPLITS
SEARCH: dict[str, Any] = {}  # ProgressiveConfig defaults: the searched schedule
MANUAL = {"schedule": "manual"}
# arm -> the progressive options of an individually trained member
ARMS = {
    "ap": SEARCH,
    "ap-manual": MANUAL,
    "ap-manual-plain": MANUAL | {"mogrow": False},
    "ap-manual-reset": MANUAL | {"optimizer_growth": "reset"},
    # A diagnostic: the searches' usual pick on this benchmark (the lowest resolution until the last
    # stage), as a manual schedule: is a loss of the searched runs the schedule's or the search's?
    "ap-manual-lowres": MANUAL | {"resolution": [0, 0, 0, 3]},
}
ABLATIONS = ("ap-manual", "ap-manual-plain", "ap-manual-reset", "ap-manual-lowres")


@dataclass(frozen=True)
class AutoProgBench(MicroBench):
    """The micro benchmark scored by the held-out validation loss (lower is better)."""

    name: str = "micro-autoprog"
    metric: str = "val_loss"
    higher_is_better: bool = False
    link_fraction: float = 0.25  # 100-step links: the reproduce benchmark's middle link length
    ablation_member: str = "micro-M"
    val_images: int = 2048

    def evaluate(self, checkpoint: Path, member: str, split: str) -> dict[str, float]:
        from compt.engine.checkpoint import model_from_checkpoint
        from compt.paradigms.clip.data import tokenizer
        from compt.paradigms.clip.data.evalsets import embedded_val_set
        from compt.paradigms.clip.evaluate import validation_loss

        model, _ = model_from_checkpoint(checkpoint)
        size, seed = model.visual.image_size[0], self.split_seeds[split]
        vset = embedded_val_set(size, seed, num_images=self.val_images, spec=BENCH_SPEC)
        return {"val_loss": validation_loss(model.eval(), vset, tokenizer(model.context_length))}


def run_job(bench: AutoProgBench, job: Job, out: str) -> dict[str, Any]:
    """recipe_lib's run (train, then score both splits), plus the schedule a progressive run trained."""
    record = recipe_lib.run_job(bench, job, out)
    folder = Path(out) / "runs" / job.key
    if "schedule" not in record and dict(job.options).get("progressive") is not None:
        from compt.engine.checkpoint import load_checkpoint

        progressive = load_checkpoint(folder / "final.pt", mmap=True).get("progressive")
        results = progressive["progression"]["results"] if progressive else {}
        record["schedule"] = {k: r["choice"] for k, r in results.items()}  # searched stages' choices
        (folder / "result.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def _progressive(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return (("progressive", options),)


def jobs(bench: AutoProgBench) -> list[Job]:
    """Every run of the protocol (module docstring), long ones first for the process pool."""
    steps, link = bench.baseline_steps, recipe_lib.link_steps(bench)
    out = recipe_lib.baseline_jobs(bench)
    out += [Job(f"ap_{m}_{steps}_s{s}", m, steps, s, arm="ap", options=_progressive(SEARCH))
            for m in bench.members for s in bench.seeds]  # fmt: skip
    out += [Job(f"{arm}_{bench.ablation_member}_{steps}_s{s}", bench.ablation_member, steps, s, arm=arm,
                options=_progressive(ARMS[arm])) for arm in ABLATIONS for s in bench.seeds]  # fmt: skip
    for arm, first in (("chain", "base"), ("chainap", "ap")):
        options = _progressive(SEARCH) if arm == "chainap" else ()
        for s in bench.seeds:
            teacher = f"{first}_{bench.members[0]}_{steps}_s{s}"
            for m in bench.members[1:]:
                key = f"{arm}_f{bench.link_fraction:g}_{m}_s{s}"
                out.append(Job(key, m, link, s, teacher, arm, options, deps=(teacher,)))
                teacher = key
    rank = {m: i for i, m in enumerate(bench.members)}
    return sorted(out, key=lambda j: -j.steps * (1 + rank.get(j.member, 0)))


# --- tables -----------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _group(bench: AutoProgBench, runs: dict[str, dict], keys: list[str], split: str) -> dict[str, Any]:
    rs = [runs[k] for k in keys]
    return {
        "loss": _mean_std([r["metrics"][split][bench.metric] for r in rs]),
        "train_macs": statistics.fmean(r["train_macs"] for r in rs),
        "wall_s": statistics.fmean(r["wall_s"] for r in rs),
        "wall_each_s": [r["wall_s"] for r in rs],
        "schedules": [r.get("schedule") for r in rs],
    }


def _versus(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other`` against ``base``: the loss gap (positive: worse), lossless (within 2 x the baseline's seed
    std), the MAC and wall speedups (> 1: ``other`` is cheaper)."""
    gap = other["loss"]["mean"] - base["loss"]["mean"]
    return {
        "gap": gap,
        "tolerance": 2 * base["loss"]["std"],
        "lossless": bool(gap <= 2 * base["loss"]["std"]),
        "macs_x": base["train_macs"] / other["train_macs"],
        "wall_x": base["wall_s"] / other["wall_s"],
    }


def tables(bench: AutoProgBench, runs: dict[str, dict], split: str = "test") -> dict[str, Any]:
    """The three comparisons on ``split``: per member, the family, the ablations."""
    steps, seeds = bench.baseline_steps, bench.seeds
    base = {m: _group(bench, runs, [baseline_key(m, steps, s) for s in seeds], split) for m in bench.members}
    members = {}
    for m in bench.members:
        ap = _group(bench, runs, [f"ap_{m}_{steps}_s{s}" for s in seeds], split)
        members[m] = {"baseline": base[m], "ap": ap, "versus": _versus(base[m], ap)}
    family = {"individual": _family(bench, base, {m: base[m] for m in bench.members})}
    family["ap-only"] = _family(bench, base, {m: members[m]["ap"] for m in bench.members})
    for arm, first in (("chain", base), ("chainap", {m: members[m]["ap"] for m in bench.members})):
        links = {m: _group(bench, runs, [f"{arm}_f{bench.link_fraction:g}_{m}_s{s}" for s in seeds], split)
                 for m in bench.members[1:]}  # fmt: skip
        family[arm] = _family(bench, base, {bench.members[0]: first[bench.members[0]], **links})
    a = bench.ablation_member
    ablations = {"ap": members[a]["ap"]} | {
        arm: _group(bench, runs, [f"{arm}_{a}_{steps}_s{s}" for s in seeds], split) for arm in ABLATIONS
    }
    ablations = {arm: g | {"versus": _versus(base[a], g)} for arm, g in ablations.items()}
    return {"members": members, "family": family, "ablations": {"baseline": base[a], **ablations}}


def _family(bench: AutoProgBench, base: dict[str, Any], runs: dict[str, Any]) -> dict[str, Any]:
    """A whole family's cost (sums over members) and each member's gap to its individual baseline."""
    macs = sum(r["train_macs"] for r in runs.values())
    wall = sum(r["wall_s"] for r in runs.values())
    versus = {m: _versus(base[m], r) for m, r in runs.items()}
    return {
        "members": {m: {"loss": r["loss"], **versus[m]} for m, r in runs.items()},
        "train_macs": macs,
        "wall_s": wall,
        "macs_x": sum(b["train_macs"] for b in base.values()) / macs,
        "wall_x": sum(b["wall_s"] for b in base.values()) / wall,
        "lossless": all(v["lossless"] for v in versus.values()),
        "worst_gap": max(v["gap"] for v in versus.values()),
    }
