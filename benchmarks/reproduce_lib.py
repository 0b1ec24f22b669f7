"""The runs behind ``benchmarks/reproduce.py``: converged baselines, chains at swept link lengths, ablations.

Paper sections reproduced in miniature: §5.1 / Fig. 4 (baselines trained with growing schedules until
the metric stops improving), Table 2 (per-member metric and individual / accumulated training-MAC
acceleration), Table 4a (chain vs every member grown from the smallest), Table 4b (IWI only = growth
with alpha 0), Fig. 6 (prepending a smaller first member) and Fig. 7 (3 vs 4 members, same size range).

Every run is one call of the engine (:func:`compt.engine.train.train_member`) evaluated with
:func:`compt.paradigms.clip.evaluate.evaluate_model`; costs are the engine's own MAC counts
(:mod:`compt.cost`). A
run is a :class:`Job`; its result lands in ``<out>/runs/<key>/result.json``, so a rerun skips finished
work. Jobs run in a small process pool (one torch thread each), a job starting when its teacher is done.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import signal
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from compt.paradigms.clip.data import DataConfig, register_dataset, tokenizer
from compt.paradigms.clip.data.synthetic import SyntheticDataset, SyntheticSpec
from compt.paradigms.clip.evaluate import higher_is_better

HERE = Path(__file__).resolve().parent
BENCH_FAMILY = str(HERE / "bench_family.yaml")
MICRO_FAMILY = str(HERE / "micro_family.yaml")  # the previous regime (benchmarks/results/previous-micro)
METRIC = "val_loss"
DATA_KIND = "synthetic-cached"

# The embedded set of the benchmark (issue 12, docs/reproduce.md): a small vocabulary (6 shapes, 4
# colours, 2 sizes, solid fills, plain black/white backgrounds) with every object centred inside
# one 8 px patch of the 32 px image (grid 4, radii scaled to fit a cell). Free placement made shape
# a slow, all-or-nothing feature (members at chance on shape, count and binding, or still jumping
# after 1M samples); inside a patch it is learned, at a speed and to a level that grow with width.
BENCH_SPEC = SyntheticSpec(
    shapes=("circle", "square", "triangle", "cross", "ring", "star"),
    colours=("red", "green", "blue", "yellow"),
    sizes=("small", "medium"),
    textures=("solid",),
    backgrounds=("black", "white"),
    patterns=("plain",),
    colour_jitter=0.04,
    pixel_noise=0.01,
    grid=4,
    object_scale=0.8,
)


@dataclass(frozen=True)
class Protocol:
    """Everything that defines a benchmark run (the same for baselines and chains, by construction)."""

    family: str = BENCH_FAMILY  # family name or YAML path
    members: tuple[str, ...] = ("bench-XS", "bench-S", "bench-M", "bench-L")  # the main chain
    three: tuple[str, ...] = ("bench-XS", "bench-M", "bench-L")  # Fig. 7: fewer members, same range
    prepend: str = ""  # Fig. 6: a smaller first member ("" to skip)
    seeds: tuple[int, ...] = (0, 1, 2)
    baseline_steps: tuple[int, ...] = (2000, 4000, 8000, 16000)  # the schedule sweep at seed 0 (Fig. 4)
    # The baseline of every comparison, trained for every seed (0: the longest sweep length); when
    # twice it is in the sweep too, that doubling is the convergence check (issue 12, criterion 2).
    # 8000 steps (102 epochs of the 10,000 scenes) is the longest reference whose protocol, doubling
    # included, fits the 3-hour budget (measured step times, docs/reproduce.md "Budget").
    reference_steps: int = 8000
    link_fractions: tuple[float, ...] = (0.125, 0.25, 0.5)  # link steps / reference steps
    alphas: tuple[Any, ...] = (0.0, 50.0, "auto")  # besides `alpha` (0 = IWI only, Table 4b)
    alpha: Any = 500.0  # App. B.1
    ablations: bool = False  # the Table 4 / Fig. 6-7 studies (seed 0), beyond the 3-hour budget
    batch: int = 128  # per-sample faster than 256 (and 64) on these members, docs/reproduce.md
    lr: float = 5e-3  # 1e-2 and 2e-2 collapse bench-S to chance; 2e-3 learns slower
    num_samples: int = 10_000  # distinct training scenes (captions re-drawn every epoch)
    spec: SyntheticSpec = BENCH_SPEC
    eval_seed: int = 1  # the test split: settings were chosen on eval seed 0's sets (docs/reproduce.md)
    eval_images: int = 2000  # per zero-shot task
    eval_retrieval: int = 1000
    eval_tasks: tuple[str, ...] = ("shape", "colour", "count", "binding")
    val_images: int = 2048  # held-out validation loss (val_loss): images, in fixed batches of val_batch
    val_batch: int = 256
    metric: str = METRIC  # the compared metric: an evaluate_model key or one of DERIVED_METRICS
    tolerance: float = 0.5  # lossless, percent metric: gap <= max(tolerance, 2 * baseline seed std)
    loss_tolerance: float = 0.02  # the same for a loss metric, in nats (docs/reproduce.md: why)

    def __post_init__(self) -> None:
        if self.reference_steps and self.reference_steps not in self.baseline_steps:
            raise ValueError(
                f"reference_steps={self.reference_steps} must be one of baseline_steps {self.baseline_steps}"
            )

    @property
    def reference(self) -> int:
        """Steps of the baseline every comparison uses (trained for every seed)."""
        return self.reference_steps or max(self.baseline_steps)

    def base_tolerance(self) -> float:
        """The lossless tolerance in the metric's own units (points, or nats for a loss)."""
        return self.tolerance if higher_is_better(self.metric) else self.loss_tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Metrics computed from evaluate_model's keys, so a finished run can be re-scored without retraining.
# Its chance/<key> entries are chance levels, not measurements: never part of a derived metric.
def _measured(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if not k.startswith("chance/")}


DERIVED_METRICS = {
    "mean_retrieval_r10": lambda m: statistics.fmean(
        v for k, v in _measured(m).items() if k.endswith("_r10")
    ),
    "mean_retrieval_r5": lambda m: statistics.fmean(v for k, v in _measured(m).items() if k.endswith("_r5")),
    "zeroshot_without_colour": lambda m: statistics.fmean(
        v for k, v in _measured(m).items() if k.startswith("zeroshot/") and k != "zeroshot/colour/top1"
    ),
}


def metric_value(metrics: dict[str, float], name: str) -> float:
    """``metrics[name]``, or the derived metric ``name`` (:data:`DERIVED_METRICS`)."""
    if name in metrics:
        return float(metrics[name])
    if name in DERIVED_METRICS:
        return float(DERIVED_METRICS[name](metrics))
    raise KeyError(
        f"metric {name!r} is neither in the run's metrics ({', '.join(metrics)}) nor derived "
        f"({', '.join(DERIVED_METRICS)})"
    )


# --- data: the embedded set, each image rendered once per process --------------------------------


class _CachedScenes:
    """The synthetic set with every image and caption pool kept after first use.

    Scene ``i`` (image and pool) is fixed by ``(seed, i)``; only the M-caption draw changes per epoch,
    so caching changes no sample, only the time spent re-rendering it in later epochs.
    """

    def __init__(self, base: SyntheticDataset):
        self.base, self.cache = base, {}

    def __len__(self) -> int:
        return len(self.base)

    def load(self, index: int, rng):
        from compt.paradigms.clip.data.captions import sample_captions
        from compt.paradigms.clip.data.synthetic import describe, render_tensor

        hit = self.cache.get(index)
        if hit is None:
            scene, srng = self.base.scene(index)
            image = render_tensor(scene, self.base.image_size, srng, self.base.spec)
            hit = self.cache[index] = (image, describe(scene, srng, self.base.spec.num_sub_captions))
        return hit[0], self.base.tokenize(sample_captions(hit[1], self.base.num_captions, rng))


_DATASETS: dict[tuple, _CachedScenes] = {}


@register_dataset(DATA_KIND)
def _cached_synthetic(cfg: DataConfig, *, image_size: int, context_length: int) -> _CachedScenes:
    key = (cfg.synthetic, cfg.num_samples, cfg.seed, image_size, context_length, cfg.num_captions)
    if key not in _DATASETS:
        base = SyntheticDataset(
            cfg.synthetic,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            image_size=image_size,
            tokenize=tokenizer(context_length),
            num_captions=cfg.num_captions,
        )
        _DATASETS[key] = _CachedScenes(base)
    return _DATASETS[key]


# --- one run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One engine run: a baseline (``teacher`` empty) or a chain link grown from ``teacher``'s result."""

    key: str  # folder name under <out>/runs
    member: str
    steps: int
    seed: int
    teacher: str = ""  # key of the teacher job
    alpha: Any = 500.0
    width: str = "insert"  # grow strategies of a link ("none"/"none": IFD only, Table 4b)
    depth: str = "duplicate"
    distill_gate: bool = False  # TrainConfig.distill_gate (beyond the paper)
    deps: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.teacher and self.teacher not in self.deps:
            object.__setattr__(self, "deps", (*self.deps, self.teacher))


def _evaluator(proto: Protocol, image_size: int, context_length: int):
    from compt.paradigms.clip.data.evalsets import embedded_eval_sets, embedded_val_set
    from compt.paradigms.clip.evaluate import evaluate_model

    tasks, rsets = embedded_eval_sets(
        image_size,
        seed=proto.eval_seed,
        num_images=proto.eval_images,
        num_retrieval=proto.eval_retrieval,
        tasks=proto.eval_tasks,
        spec=proto.spec,
    )
    vsets = []
    if proto.val_images:
        vsets = [
            embedded_val_set(
                image_size,
                proto.eval_seed,
                num_images=proto.val_images,
                batch_size=proto.val_batch,
                spec=proto.spec,
            )
        ]
    tok = tokenizer(context_length)
    return lambda model, step: evaluate_model(model, tasks, rsets, tok, val_sets=vsets)


def run_job(proto: Protocol, job: Job, out: str) -> dict[str, Any]:
    """Train and evaluate ``job`` with the engine (or read its finished result); returns the result dict."""
    import torch

    from compt.engine.train import TrainConfig, train_member
    from compt.families import get_member

    torch.set_num_threads(1)  # the pool runs one job per core
    folder = Path(out) / "runs" / job.key
    done = folder / "result.json"
    if done.is_file():
        return check_reusable(json.loads(done.read_text()), proto, done)
    member = get_member(job.member, proto.family)
    teacher = str(Path(out) / "runs" / job.teacher / "final.pt") if job.teacher else None
    if teacher and not Path(teacher).is_file():
        raise FileNotFoundError(
            f"{job.key}: its teacher {job.teacher} has a result but no weights ({teacher}); a run "
            "restored from results.json cannot teach: delete its folder to retrain it"
        )
    data = DataConfig(kind=DATA_KIND, num_samples=proto.num_samples, seed=0, synthetic=proto.spec)
    cfg = TrainConfig(
        member=job.member,
        family=proto.family,
        data=data,
        steps=job.steps,
        global_batch_size=proto.batch,
        lr=proto.lr,
        seed=job.seed,
        out_dir=str(folder),
        save_every_steps=0,
        log_every_steps=max(1, job.steps // 10),
        teacher=teacher,
        alpha=job.alpha,
        width=job.width,
        depth=job.depth,
        distill_gate=job.distill_gate,
        device="cpu",
    )
    start, cpu = time.perf_counter(), time.process_time()
    result = train_member(cfg, evaluate=_evaluator(proto, member.image_size, member.context_length))
    record = {
        "job": asdict(job),
        "metrics": result.metrics,
        "train_macs": result.train_macs,
        "wall_s": result.wall_s,
        "total_s": time.perf_counter() - start,
        # CPU seconds of the whole job (one torch thread): its cost on an idle core, whatever else
        # shared the machine while it ran (wall_s is inflated by other load).
        "cpu_s": time.process_time() - cpu,
        "steps": result.steps,
        "samples_seen": result.samples_seen,
        "setup": run_setup(proto),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


# Protocol fields that change what a run trains on or how it is scored: a finished run is reused
# only when they all match (a rerun with another lr into the same --out must not mix the two).
SETUP_FIELDS = ("family", "batch", "lr", "num_samples", "spec", "eval_seed", "eval_images",
                "eval_retrieval", "eval_tasks", "val_images", "val_batch")  # fmt: skip


def run_setup(proto: Protocol) -> dict[str, Any]:
    """The fields of ``proto`` a finished run must share to be reused (JSON-ready); the family by its
    members' model configs, so the same YAML in another checkout matches."""
    from compt.families import get_family

    setup = {k: getattr(proto, k) for k in SETUP_FIELDS}
    setup["family"] = {m.name: m.model_cfg for m in get_family(proto.family).members}
    return json.loads(json.dumps(setup, default=asdict))


def lineage(record: dict[str, Any], runs: Path) -> list[str]:
    """The members a finished run's weights depend on: its own, then its teacher's, and so on up the
    chain (each teacher's ``result.json`` in ``runs``). A baseline depends on its member only."""
    names, teacher = [record["job"]["member"]], record["job"].get("teacher", "")
    while teacher:
        path = runs / teacher / "result.json"
        if not path.is_file():
            break  # the teacher is not finished: its own check comes first (jobs run after their deps)
        job = json.loads(path.read_text())["job"]
        names.append(job["member"])
        teacher = job.get("teacher", "")
    return names


def check_reusable(record: dict[str, Any], proto: Protocol, path: Path) -> dict[str, Any]:
    if "setup" not in record:  # runs of the previous regime (before issue 12) carry no setup
        raise RuntimeError(f"{path}: a run without its protocol setup; use another --out folder")
    ours, theirs = run_setup(proto), dict(record["setup"])
    # Of the family, only the members the run depends on: changing the smallest member retrains the
    # chains grown from it, not the other members' baselines.
    names = lineage(record, path.parent.parent)
    ours["family"] = {n: ours["family"].get(n) for n in names}
    theirs["family"] = {n: (theirs.get("family") or {}).get(n) for n in names}
    diff = [k for k in SETUP_FIELDS if theirs.get(k) != ours[k]]
    if diff:
        raise RuntimeError(
            f"{path} was trained with another protocol ({', '.join(diff)} differ: "
            f"{ {k: theirs.get(k) for k in diff} } vs { {k: ours[k] for k in diff} }); "
            "use another --out folder, or the same settings"
        )
    return record


def restore_runs(results_json: Path, out: Path, proto: Protocol) -> tuple[int, int]:
    """Write the runs recorded in a committed ``results.json`` back as ``<out>/runs/<key>/result.json``
    where none is there (the runs' folders are not committed); returns (restored, skipped).

    A record is kept only if ``proto`` could reuse it (:func:`check_reusable`: same setup, same
    configs of the members it depends on); the others are skipped and will be retrained. Only the
    records come back, not the weights: a restored run cannot teach a link still to train.
    """
    written = []
    for key, record in json.loads(Path(results_json).read_text())["runs"].items():
        done = out / "runs" / key / "result.json"
        if not done.is_file():
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(record, indent=1))
            written.append(done)
    skipped = []
    for done in written:  # checked once all are written: a link's lineage reads its teacher's record
        try:
            check_reusable(json.loads(done.read_text()), proto, done)
        except RuntimeError:
            skipped.append(done)
    for done in skipped:
        done.unlink()
        if not any(done.parent.iterdir()):
            done.parent.rmdir()
    return len(written) - len(skipped), len(skipped)


def run_jobs(
    proto: Protocol, jobs: list[Job], out: str, workers: int, log=print, runner=None
) -> dict[str, dict]:
    """Run ``jobs`` (each after its dependencies) on ``workers`` processes; returns key -> result.

    ``runner(proto, job, out) -> result`` trains one job (default :func:`run_job`; benchmarks/recipe_lib.py
    passes its own, with its own protocol and jobs).
    """
    import compt.engine.train  # noqa: F401  (imported before forking: workers share one snapshot of the code)

    run_job_fn = runner or run_job
    by_key = {j.key: j for j in jobs}
    results: dict[str, dict] = {}
    pending = list(jobs)
    running: dict[Any, Job] = {}
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    previous = None
    if pool is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_pool)
    try:
        while pending or running:
            ready = [j for j in pending if all(d in results or d not in by_key for d in j.deps)]
            for job in ready[: (workers - len(running)) if pool else 1]:
                pending.remove(job)
                if pool is None:
                    results[job.key] = run_job_fn(proto, job, out)
                    log(f"  done {job.key} ({results[job.key]['wall_s']:.0f} s)")
                else:
                    running[pool.submit(run_job_fn, proto, job, out)] = job
            if pool is None:
                if pending and not ready:
                    raise RuntimeError(f"jobs waiting on unknown dependencies: {[j.key for j in pending]}")
                continue
            if not running:
                raise RuntimeError(f"jobs waiting on unknown dependencies: {[j.key for j in pending]}")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                results[job.key] = fut.result()
                log(f"  done {job.key} ({results[job.key]['wall_s']:.0f} s)")
    except _PoolStopped as stop:
        # A scheduler's SIGTERM reaches this process only: pass it on, so that each running job saves
        # its step checkpoint and stops (the engine's SIGTERM handling) instead of training on as an
        # orphan once this process is gone; the shutdown below waits for them. Then exit 143.
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise SystemExit(128 + stop.signum) from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


class _PoolStopped(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _stop_pool(signum: int, frame: Any) -> None:
    raise _PoolStopped(signum)


# --- the protocol as jobs ---------------------------------------------------------------------------


def _fkey(f: float) -> str:
    return f"{f:g}".replace(".", "p")


def _akey(alpha: Any) -> str:
    return str(alpha) if isinstance(alpha, str) else f"{float(alpha):g}"


def baseline_key(member: str, steps: int, seed: int) -> str:
    return f"base_{member}_{steps}_s{seed}"


def chain_jobs(
    proto: Protocol,
    name: str,
    members: tuple[str, ...],
    first: str,
    fraction: float,
    seed: int,
    alpha: Any,
    grow_all_from_first: bool = False,
) -> list[Job]:
    """The links of a chain whose first member is the finished job ``first``; link k trains
    ``fraction`` of member k's baseline steps, grown from link k-1 (or from ``first`` for Table 4a)."""
    jobs, teacher = [], first
    for m in members[1:]:
        steps = max(1, round(fraction * proto.reference))
        job = Job(key=f"{name}_{m}_s{seed}", member=m, steps=steps, seed=seed, teacher=teacher, alpha=alpha)
        jobs.append(job)
        teacher = first if grow_all_from_first else job.key
    return jobs


def link_variant_jobs(proto: Protocol, fraction: float, seed: int, alpha: Any = 500.0) -> list[Job]:
    """The last link of the main chain, retrained from the finished chain's teacher (its second-largest
    member at ``fraction`` and ``alpha``) in two variants: IFD only (no growth) and the gated IFD."""
    teacher = f"{chain_name('chain', fraction, alpha, proto.members[0])}_{proto.members[-2]}_s{seed}"
    steps = max(1, round(fraction * proto.reference))
    m, tail = proto.members[-1], f"f{_fkey(fraction)}_a{_akey(alpha)}_{proto.members[-1]}_s{seed}"
    common = dict(member=m, steps=steps, seed=seed, teacher=teacher, alpha=alpha)
    return [
        Job(key=f"ifd-only_{tail}", width="none", depth="none", **common),
        Job(key=f"gate_{tail}", distill_gate=True, **common),
    ]


def chain_name(tag: str, fraction: float, alpha: Any, first: str) -> str:
    """Run-folder prefix of a chain variant; ``first`` (the first member) keeps chains from
    different first members apart when they share a results folder."""
    return f"{tag}-{first}_f{_fkey(fraction)}_a{_akey(alpha)}"


def baseline_jobs(proto: Protocol, members: tuple[str, ...]) -> list[Job]:
    """Seed 0 at every sweep length, other seeds at the reference (the baseline of the comparison)."""
    ref = proto.reference
    jobs = [
        Job(baseline_key(m, s, proto.seeds[0]), m, s, proto.seeds[0])
        for m in members
        for s in proto.baseline_steps
    ]
    jobs += [Job(baseline_key(m, ref, seed), m, ref, seed) for m in members for seed in proto.seeds[1:]]
    return sorted(jobs, key=lambda j: -j.steps * _size_rank(proto, j.member))  # long jobs first: packing


def _size_rank(proto: Protocol, member: str) -> int:
    order = [proto.prepend, *proto.members]
    return 1 + order.index(member) if member in order else 1


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def replace_proto(proto: Protocol, **changes) -> Protocol:
    return replace(proto, **changes)
