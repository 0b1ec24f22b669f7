"""The runs behind ``benchmarks/recipe.py`` (issue 13): each chain-recipe option against the paper's recipe.

An **arm** is a set of TrainConfig overrides for the links of a chain (:data:`ARMS`), in one of four
groups: alpha (item 1), distillation schedule (item 2), growth (item 3), optimizer and schedule
hand-over (item 4). Every arm trains the same chain at the same link lengths and seeds, from the same
first member (its baseline); the baselines are the benchmark's individually trained members.

A benchmark is a :class:`Bench`: which family and members, the baseline schedule, the training
fields every run shares, and an ``evaluate(checkpoint, member, split)`` for a ``val`` and a ``test``
split. ``micro`` (:class:`MicroBench`) is the embedded-data benchmark of ``benchmarks/reproduce.py``
with the held-out evaluation scenes of seed 1 as validation and those of seed 0 (what reproduce.py
reports) as test. Another benchmark plugs in as ``--bench path/to/module.py:factory``.

Every run is one engine call (:func:`compt.engine.train.train_member`); its result, with the metrics
of both splits, lands in ``<out>/runs/<key>/result.json``, so a rerun skips finished work. The
recipe is chosen on the validation split and reported on the test split.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reproduce_lib import BENCH_SPEC, DATA_KIND, MICRO_FAMILY, metric_value

SPLITS = ("val", "test")

# name -> (group, link overrides). The reference is the paper's recipe: insert + duplicate, alpha 500
# (the paper's weight at D = 512), constant, fresh AdamW, short warmup, cosine over the link.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper": ("reference", {}),
    "paper-literal": ("alpha", {"alpha_ref_dim": None}),  # alpha 500 on the per-dim MSE (old compt)
    "alpha0": ("alpha", {"alpha": 0.0}),  # IWI only (Table 4b)
    "auto": ("alpha", {"alpha": "auto"}),  # L_IFD / L_task = 0.1 (App. D.2)
    "ki-linear": ("schedule", {"alpha_schedule": "linear", "alpha_schedule_fraction": 0.44}),  # KI: 55k/125k
    "salt-step": ("schedule", {"alpha_schedule": "step", "alpha_schedule_fraction": 0.5}),  # SALT
    "gate": ("schedule", {"distill_gate": True}),  # beyond the paper
    "net2net": ("growth", {"width": "net2net"}),
    "hypercloning": ("growth", {"width": "hypercloning"}),
    "msg": ("growth", {"width": "msg", "mask_ramp_fraction": 0.25}),
    "staged": ("optimizer", {"optimizer_init": "grown"}),  # moments grown; the link's usual warmup
    "no-warmup": ("optimizer", {"warmup_steps": 0}),  # a grown link starts at the peak lr
    "lemon": ("optimizer", {"warmup_steps": 0, "lr_decay_fraction": 0.5, "min_lr_ratio": 0.1}),
}
BEST = "best"  # the combination of each group's winner on the validation split


@dataclass(frozen=True)
class Bench:
    """What the harness needs from a benchmark. Subclass it and override :meth:`train_fields` and
    :meth:`evaluate`; every field can be overridden from the command line (``--set``)."""

    name: str
    family: str
    members: tuple[str, ...]  # the chain, smallest first
    baseline_steps: int  # every baseline, and the first member
    seeds: tuple[int, ...] = (0, 1, 2)
    link_fraction: float = 0.125  # link steps / baseline steps, the same for every arm
    metric: str = "mean_retrieval_r10"  # the headline metric (a key of evaluate(), or derived)
    higher_is_better: bool = True
    tolerance: float = 0.5  # lossless: gap <= max(tolerance, 2 x the baseline's seed std)
    arms: tuple[str, ...] = tuple(ARMS)
    combine: bool = True  # also train the combination of each group's best arm

    def train_fields(self) -> dict[str, Any]:
        """TrainConfig fields every run shares (data, batch, lr, ...)."""
        raise NotImplementedError

    def evaluate(self, checkpoint: Path, member: str, split: str) -> dict[str, float]:
        """The metrics of ``checkpoint`` (a ``member``) on ``split`` (``val`` or ``test``)."""
        raise NotImplementedError

    def adopt(self, job: Job, folder: Path) -> dict[str, Any] | None:
        """The finished result of ``job`` trained elsewhere under the same protocol (its ``metrics``
        by split, at least ``test``; a link's weights put in ``folder``), or None to train it here."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class MicroBench(Bench):
    """The embedded-data benchmark of reproduce.py (micro family, 2 CPU cores)."""

    name: str = "micro"
    family: str = MICRO_FAMILY
    members: tuple[str, ...] = ("micro-XS", "micro-S", "micro-M", "micro-L")
    baseline_steps: int = 400
    batch: int = 128
    lr: float = 5e-3
    num_samples: int = 20_000
    eval_images: int = 1000
    eval_retrieval: int = 500
    eval_tasks: tuple[str, ...] = ("shape", "colour", "count", "binding")
    split_seeds: dict[str, int] = field(default_factory=lambda: {"val": 1, "test": 0})

    def train_fields(self) -> dict[str, Any]:
        from compt.config import to_dict
        from compt.paradigms.clip.data import DataConfig

        data = DataConfig(kind=DATA_KIND, num_samples=self.num_samples, seed=0, synthetic=BENCH_SPEC)
        return {"data": to_dict(data), "global_batch_size": self.batch, "lr": self.lr}

    def evaluate(self, checkpoint: Path, member: str, split: str) -> dict[str, float]:
        from compt.engine.checkpoint import model_from_checkpoint
        from compt.paradigms.clip.data import tokenizer
        from compt.paradigms.clip.data.evalsets import embedded_eval_sets
        from compt.paradigms.clip.evaluate import evaluate_model

        model, _ = model_from_checkpoint(checkpoint)
        size, ctx = model.visual.image_size[0], model.context_length
        tasks, rsets = embedded_eval_sets(
            size,
            seed=self.split_seeds[split],
            num_images=self.eval_images,
            num_retrieval=self.eval_retrieval,
            tasks=self.eval_tasks,
            spec=BENCH_SPEC,
        )
        return evaluate_model(model.eval(), tasks, rsets, tokenizer(ctx))


BENCHES = {"micro": MicroBench}


# --- jobs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One engine run: a baseline (``teacher`` empty) or a link of arm ``arm`` grown from ``teacher``."""

    key: str
    member: str
    steps: int
    seed: int
    teacher: str = ""
    arm: str = ""
    options: tuple[tuple[str, Any], ...] = ()  # TrainConfig overrides
    deps: tuple[str, ...] = ()


def baseline_key(member: str, steps: int, seed: int) -> str:
    return f"base_{member}_{steps}_s{seed}"


def baseline_jobs(bench: Bench) -> list[Job]:
    return [
        Job(baseline_key(m, bench.baseline_steps, s), m, bench.baseline_steps, s)
        for m in bench.members
        for s in bench.seeds
    ]


def link_steps(bench: Bench) -> int:
    return max(1, round(bench.link_fraction * bench.baseline_steps))


def chain_jobs(bench: Bench, arm: str, options: dict[str, Any]) -> list[Job]:
    """The links of ``arm``'s chain for every seed, the first member being its baseline."""
    jobs = []
    for seed in bench.seeds:
        teacher = baseline_key(bench.members[0], bench.baseline_steps, seed)
        for m in bench.members[1:]:
            key = f"{arm}_f{bench.link_fraction:g}_{m}_s{seed}"
            opts = tuple(sorted(options.items()))
            jobs.append(Job(key, m, link_steps(bench), seed, teacher, arm, opts, deps=(teacher,)))
            teacher = key
    return jobs


def run_job(bench: Bench, job: Job, out: str) -> dict[str, Any]:
    """Train ``job`` with the engine and evaluate it on both splits (or read its finished result)."""
    import torch

    from compt.config import from_dict
    from compt.engine.train import TrainConfig, train_member

    torch.set_num_threads(1)  # the pool runs one job per core
    folder = Path(out) / "runs" / job.key
    done = folder / "result.json"
    if done.is_file():
        record = json.loads(done.read_text())
        # run keys name the arm, link fraction, member and seed, not the steps: a finished run of
        # another baseline schedule in the same --out must not stand in for this one
        finished = {k: record["job"][k] for k in ("steps", "teacher", "deps", "options")}
        wanted = json.loads(json.dumps({k: getattr(job, k) for k in finished}, default=str))
        if finished != wanted:
            differ = ", ".join(k for k in finished if finished[k] != wanted[k])
            raise RuntimeError(
                f"{done}: a finished run of another job ({differ} differ): use another --out "
                "for another baseline schedule or arm definition, or delete the folder to retrain it"
            )
        return record
    folder.mkdir(parents=True, exist_ok=True)
    adopted = bench.adopt(job, folder)
    if adopted is not None:
        done.write_text(json.dumps(adopted, indent=1, default=str))
        return adopted
    fields = bench.train_fields() | dict(job.options)
    fields |= dict(
        member=job.member,
        family=bench.family,
        steps=job.steps,
        seed=job.seed,
        out_dir=str(folder),
        teacher=str(Path(out) / "runs" / job.teacher / "final.pt") if job.teacher else None,
        keep_moments=True,  # any run can teach a "staged" link (tiny models: the disk is no concern)
        save_every_steps=0,
        log_every_steps=max(1, job.steps // 10),
        device="cpu",
    )
    start = time.perf_counter()
    result = train_member(from_dict(TrainConfig, fields, where=f"recipe job {job.key}"))
    record = {
        "job": asdict(job),
        "metrics": {split: bench.evaluate(result.final_checkpoint, job.member, split) for split in SPLITS},
        "train_macs": result.train_macs,
        "wall_s": result.wall_s,
        "total_s": time.perf_counter() - start,
        "steps": result.steps,
    }
    done.write_text(json.dumps(record, indent=1, default=str))
    return record


# --- comparison ------------------------------------------------------------------------------------


def _value(bench: Bench, run: dict, split: str) -> float:
    return metric_value(run["metrics"][split], bench.metric)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def baselines(bench: Bench, runs: dict[str, dict], split: str) -> dict[str, dict[str, float]]:
    """Per member: mean and std over seeds of the metric, and the MACs / wall of one baseline."""
    out = {}
    for m in bench.members:
        rs = [runs[baseline_key(m, bench.baseline_steps, s)] for s in bench.seeds]
        mean, std = _mean_std([_value(bench, r, split) for r in rs])
        out[m] = {
            "mean": mean,
            "std": std,
            "train_macs": rs[0]["train_macs"],
            "wall_s": _mean_std([r["wall_s"] for r in rs])[0],
        }
    return out


def validation_score(bench: Bench, runs: dict[str, dict], arm: str) -> float:
    """Mean over links and seeds of how much better ``arm``'s chain is than the paper's recipe on the
    validation split, in the metric's units (0 for the paper's recipe): the one number the recipe is
    chosen by. Against the paper's chain, not the baselines: the baselines are the same for every arm,
    so the ranking is the same, and a bench may adopt baselines evaluated on the test split only."""
    sign = 1 if bench.higher_is_better else -1

    def link(a: str, m: str, s: int) -> float:
        return _value(bench, runs[f"{a}_f{bench.link_fraction:g}_{m}_s{s}"], "val")

    return statistics.fmean(
        sign * (link(arm, m, s) - link("paper", m, s)) for s in bench.seeds for m in bench.members[1:]
    )


def choose(bench: Bench, runs: dict[str, dict], arms: list[str]) -> dict[str, Any]:
    """Each group's best arm on validation; the combination keeps those that beat the paper's recipe."""
    scores = {arm: validation_score(bench, runs, arm) for arm in arms}
    winners, options = {}, {}
    for arm in arms:
        group = ARMS[arm][0]
        if group != "reference" and (group not in winners or scores[arm] > scores[winners[group]]):
            winners[group] = arm
    for arm in winners.values():
        if scores[arm] > scores.get("paper", float("-inf")):
            options |= ARMS[arm][1]
    return {"val_scores": scores, "group_winners": winners, "best_options": options}


def arm_table(bench: Bench, runs: dict[str, dict], arm: str, split: str = "test") -> dict[str, Any]:
    """Per member of ``arm``'s chain on ``split``: metric, gap to the baseline, lossless, acceleration."""
    base = baselines(bench, runs, split)
    first = bench.members[0]
    rows = {first: {"chain": base[first]["mean"], "first_member": True}}
    acc_base, acc_chain = base[first]["train_macs"], base[first]["train_macs"]
    acc_base_s, acc_chain_s = base[first]["wall_s"], base[first]["wall_s"]
    sign = 1 if bench.higher_is_better else -1
    for m in bench.members[1:]:
        rs = [runs[f"{arm}_f{bench.link_fraction:g}_{m}_s{s}"] for s in bench.seeds]
        mean, std = _mean_std([_value(bench, r, split) for r in rs])
        macs, wall = _mean_std([r["train_macs"] for r in rs])[0], _mean_std([r["wall_s"] for r in rs])[0]
        acc_base, acc_chain = acc_base + base[m]["train_macs"], acc_chain + macs
        acc_base_s, acc_chain_s = acc_base_s + base[m]["wall_s"], acc_chain_s + wall
        gap = sign * (base[m]["mean"] - mean)
        tol = max(bench.tolerance, 2 * base[m]["std"])
        rows[m] = {
            "baseline": base[m]["mean"],
            "baseline_std": base[m]["std"],
            "chain": mean,
            "chain_std": std,
            "gap": gap,
            "tolerance": tol,
            "lossless": bool(gap <= tol),
            "macs_x_individual": base[m]["train_macs"] / macs,
            "macs_x_accumulated": acc_base / acc_chain,
            "wall_x_accumulated": acc_base_s / acc_chain_s,
        }
    links = [rows[m] for m in bench.members[1:]]
    summary = {
        "accumulated_macs_x": links[-1]["macs_x_accumulated"],
        "worst_gap": max(r["gap"] for r in links),
        "lossless": all(r["lossless"] for r in links),
    }
    return {"members": rows, "summary": summary}
