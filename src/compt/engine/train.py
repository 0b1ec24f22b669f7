"""The training engine: one member, trained individually or as a chain link (§3.1-3.2, App. B.1, Table C).

A baseline member is a chain link with ``teacher=None``: one loop, not two. A link grows its student
from the teacher (:func:`compt.grow.grow`, inverse weight initialization) and adds the inverse
feature distillation loss (:mod:`compt.distill`) to the task loss. What a batch, the task loss and
the distilled features are is the member's paradigm's (:mod:`compt.paradigms`; for CLIP the
multi-caption contrastive loss of Eq. 2-3); this module knows no paradigm.

Launch (docs/train.md)::

    compt train --member tiny-S --data synthetic --epochs 2                      # one process, CPU or 1 GPU
    torchrun --nproc_per_node 8 -m compt train --member ViT-B/16 --data cc3m.csv # 8 GPUs, one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m compt train --member ViT-L/16 --data 'shards/{000000..003000}.tar'     # 2 nodes x 8 GPUs

From Python: ``train_member(TrainConfig(member="tiny-S", data=DataConfig(kind="synthetic")))``.
The run writes ``out_dir/step_<N>.pt`` (resumable), ``out_dir/final.pt`` and ``out_dir/metrics.jsonl``;
rerunning with the same ``out_dir`` resumes exactly where it stopped, and a finished run returns at once.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compt.config import from_dict, to_dict
from compt.cost import member_cost, run_steps
from compt.distill import (
    DEFAULT_ALPHA,
    DEFAULT_RATIO,
    DEFAULT_REF_DIM,
    Distiller,
    list_alpha_schedules,
    load_teacher,
    make_projection,
)
from compt.engine import dist
from compt.engine.checkpoint import (
    check_writable,
    checkpoint_digest,
    latest_checkpoint,
    save_checkpoint,
)
from compt.engine.interrupt import TrainingInterrupted, signal_name, stop_agreed, stop_on_signals
from compt.engine.lock import hold
from compt.engine.optim import (
    PAPER_WARMUP_STEPS,
    CosineSchedule,
    build_optimizer,
    load_moments,
    moments_by_name,
)
from compt.engine.resume import DataStream, check_prior_run, model_payload, restore_run, save_run, seed_all
from compt.engine.runlog import NonFiniteLossError, RunLog, check_finite, evaluate_now, log_step
from compt.families import Member, get_member
from compt.grow import grow, grow_moments, list_depth_strategies, list_width_strategies
from compt.grow.masks import GrowthMask
from compt.paradigms import Paradigm

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "train_member",
    "check_runtime",
]

_LOG = logging.getLogger("compt.train")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZER_INITS = ("fresh", "grown")  # a link's AdamW state: new (paper), or grown from the teacher's


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run of one member (baseline or chain link)."""

    member: str  # member name in the family registry, e.g. "ViT-B/16", "tiny-S"
    data: Any  # the paradigm's data config (CLIP: compt.paradigms.clip.data.DataConfig), or its dict
    out_dir: str = "runs/train"  # folder of step_<N>.pt, final.pt and metrics.jsonl; resumed if present
    family: str | None = None  # family (name or YAML path) holding `member`; None: any registered family
    epochs: float = 1.0  # passes over the data (fractions allowed); ignored when `steps` is set
    steps: int | None = None  # optimizer steps of the whole run; overrides `epochs`
    global_batch_size: int = 1024  # samples per optimizer step, summed over ranks (Table C: 1024)
    accum_steps: int = 1  # micro-batches per optimizer step; contrastive negatives come from one micro-batch
    lr: float = 1e-3  # peak learning rate (Table C: 1e-3)
    min_lr_ratio: float = 0.0  # learning rate at the end of the cosine, as a fraction of `lr`
    warmup_steps: int | None = (
        None  # linear warmup, optimizer steps; None: Table C (8000 / 1000 for a link), <= 10% of the run
    )
    weight_decay: float = 0.1  # AdamW decoupled decay, not on norms, biases, embeddings, logit scale
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (Table C)
    eps: float | None = None  # AdamW eps; None: the paradigm's default (CLIP: 1e-6 for ViTs, official code)
    grad_clip: float = 0.0  # max global gradient L2 norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a grad scaler)
    compile: bool = False  # torch.compile the student's forward
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise reproducible, slower
    seed: int = 0  # model init and growth seed; rank r seeds its own RNGs with seed + r
    save_every_steps: int = 1000  # write step_<N>.pt every this many optimizer steps (0: only final.pt)
    keep_last: int = 2  # step_*.pt files kept (0: keep all)
    log_every_steps: int = 10  # metrics.jsonl line and progress update every this many steps
    eval_every_steps: int = 0  # call `evaluate` every this many steps (0: only at the end)
    teacher: str | None = None  # teacher checkpoint (.pt): a chain link; None: a baseline member
    width: str = "insert"  # compt.grow width strategy (chain links only, App. D.1)
    depth: str = "duplicate"  # compt.grow depth strategy (chain links only, App. D.1)
    alpha: float | str = (
        DEFAULT_ALPHA  # IFD weight of Eq. 1 (App. B.1: 500) or "auto" (hold L_IFD/L_task at alpha_ratio)
    )
    alpha_ratio: float = DEFAULT_RATIO  # target L_IFD / L_task of alpha="auto" (App. D.2: r = 0.1)
    # issue 13: a fixed alpha is the paper's weight at this embedding width (L_IFD x D / alpha_ref_dim);
    # None: the literal per-dimension MSE (checkpoints written before issue 13 mean this)
    alpha_ref_dim: int | None = DEFAULT_REF_DIM
    alpha_schedule: str = "constant"  # constant (paper) | linear (to 0, Knowledge Inheritance) | step (SALT)
    alpha_schedule_fraction: float = 1.0  # fraction of the run where `linear` reaches 0 / `step` ends
    distill_gate: bool = False  # beyond the paper: no L_IFD on steps where student L_task < teacher L_task
    mask_ramp_fraction: float = 0.25  # width "msg": fraction of the run over which growth masks go 0 -> 1
    optimizer_init: str = "fresh"  # fresh AdamW (paper) | grown: the teacher's moments grown with weights
    keep_moments: bool = False  # final.pt also holds the AdamW moments (a teacher of a grown-moments link)
    lr_decay_fraction: float = 1.0  # the cosine reaches min_lr after this fraction of the post-warmup run
    device: str = "auto"  # auto (this rank's GPU if any, else CPU) | cpu | cuda | cuda:K

    def __post_init__(self) -> None:
        # An unknown member fails here, naming the nearest one; its paradigm reads the data config.
        data_config = get_member(self.member, self.family).paradigm.data_config
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", from_dict(data_config, self.data, where="train.data"))
        if not isinstance(self.data, data_config):
            raise ValueError(
                f"train.data must be a {data_config.__module__}.{data_config.__name__} (or its fields as a "
                f"mapping) for member {self.member}, got {type(self.data).__name__}"
            )
        alpha_ok = self.alpha == "auto" or (
            not isinstance(self.alpha, str) and math.isfinite(self.alpha) and self.alpha >= 0
        )
        checks = [
            ("epochs", self.steps is not None or self.epochs > 0, "must be > 0 (or set `steps`)"),
            ("steps", self.steps is None or self.steps > 0, "must be > 0, or None to use `epochs`"),
            ("global_batch_size", self.global_batch_size >= 1, "must be >= 1"),
            (
                "accum_steps",
                self.accum_steps >= 1 and self.global_batch_size % self.accum_steps == 0,
                f"must be >= 1 and divide global_batch_size={self.global_batch_size}",
            ),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a finite number > 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be >= 0 or None"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            (
                "betas",
                len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "must be two numbers in [0, 1)",
            ),
            ("eps", self.eps is None or self.eps > 0, "must be > 0, or None for the per-model default"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("save_every_steps", self.save_every_steps >= 0, "must be >= 0"),
            ("keep_last", self.keep_last >= 0, "must be >= 0"),
            ("log_every_steps", self.log_every_steps >= 1, "must be >= 1"),
            ("eval_every_steps", self.eval_every_steps >= 0, "must be >= 0"),
            ("alpha", alpha_ok, "must be a finite number >= 0 or 'auto'"),
            ("alpha_ratio", self.alpha_ratio > 0, "must be > 0"),
            (
                "alpha_ref_dim",
                self.alpha_ref_dim is None or self.alpha_ref_dim >= 1,
                "must be >= 1 (the width at which alpha is meant, 512 in the paper) or null (per dim)",
            ),
            (
                "alpha_schedule",
                self.alpha_schedule in list_alpha_schedules(),
                f"must be one of {', '.join(list_alpha_schedules())}",
            ),
            ("alpha_schedule_fraction", 0 < self.alpha_schedule_fraction <= 1, "must be in (0, 1]"),
            (
                "alpha_schedule_fraction",
                self.alpha_schedule != "constant" or self.alpha_schedule_fraction == 1,
                "only applies to alpha_schedule linear or step; leave it at 1 with constant",
            ),
            # Looked up only when a link grows: a typo would fail after the previous member trained.
            ("width", self.width in list_width_strategies(), _one_of(self.width, list_width_strategies())),
            ("depth", self.depth in list_depth_strategies(), _one_of(self.depth, list_depth_strategies())),
            ("mask_ramp_fraction", 0 < self.mask_ramp_fraction <= 1, "must be in (0, 1]"),
            ("optimizer_init", self.optimizer_init in OPTIMIZER_INITS, f"must be one of {OPTIMIZER_INITS}"),
            ("lr_decay_fraction", 0 < self.lr_decay_fraction <= 1, "must be in (0, 1]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"train.{name} {why} (got {getattr(self, name)!r})")
        if not _DEVICE.fullmatch(str(self.device)):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:K (got {self.device!r})")
        if not isinstance(self.alpha, str):
            object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _one_of(value: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(str(value), options, n=1)
    return f"must be one of {', '.join(options)}" + (f"; did you mean {close[0]!r}?" if close else "")


def check_runtime(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` when this machine cannot run ``cfg``: no such device, fp16 without CUDA.

    :func:`compt.chain.load_spec` calls it for every member, so that the spec fails when it is loaded,
    not after a member trained (issue 11); ``train_member`` finds the same errors at setup.
    """
    _precision(cfg, dist.resolve_device(cfg.device, dist.launch_local_rank()))


@dataclass
class TrainState:
    """Where the run is: the counters a checkpoint restores (torchtitan-style ``state_dict``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done in the current epoch (the data position)
    samples_seen: int = 0  # training samples consumed, all ranks together
    train_macs: int = 0  # cumulative training MACs (App. C.2), teacher forward included for a link
    wall_s: float = 0.0  # training wall time, seconds, across resumes (evaluation excluded)
    eval_s: float = 0.0  # wall time spent in `evaluate`, seconds

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run hands to its caller (e.g. the chain orchestrator)."""

    final_checkpoint: Path  # out_dir/final.pt
    train_macs: int  # cumulative training MACs of the run
    wall_s: float  # training wall time, seconds
    steps: int  # optimizer steps done
    samples_seen: int  # training samples consumed
    metrics: dict[str, float] = field(default_factory=dict)  # the last `evaluate` result ({} if none)
    planned_steps: int = 0  # steps the schedule planned (> steps when `should_stop` ended the run early)


@dataclass
class _Run:
    """Everything one run holds while it trains (built by :func:`_setup`)."""

    cfg: TrainConfig
    info: dist.DistInfo
    member: Member
    paradigm: Paradigm  # the member's: batch, task loss, distilled features
    model: nn.Module  # the plain student (what checkpoints store)
    projection: nn.Module  # T of Eq. 1 (identity for a baseline or equal feature dims)
    forward: nn.Module  # the paradigm's student forward, maybe compiled and DDP-wrapped
    distiller: Distiller | None
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    data: DataStream
    log: RunLog
    total_steps: int
    state: TrainState
    macs_per_step: int
    teacher_info: dict[str, Any] | None
    teacher_macs_per_step: int = 0  # the teacher forward's share of macs_per_step (none if L_IFD is off)
    masks: GrowthMask | None = None  # MSG's growth masks while they ramp (width "msg"), else None
    stop_signal: int = 0  # SIGTERM/SIGINT received (compt.engine.interrupt); 0: none
    clock: float = field(default_factory=time.perf_counter)
    first_bad_step: torch.Tensor | None = None  # on device; -1 while every loss so far was finite

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def local_batch_size(self) -> int:
        """Nominal samples per rank per micro-batch."""
        return self.cfg.global_batch_size // (self.cfg.accum_steps * self.info.world_size)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def tick(self) -> None:
        """Advance the training wall clock to now."""
        now = time.perf_counter()
        self.state.wall_s += now - self.clock
        self.clock = now


# --- the training step ---------------------------------------------------------------------------


def _train_step(run: _Run, micro_batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """One optimizer step of Eq. 4 over ``accum_steps`` micro-batches; returns detached stats."""
    device, world, n = run.info.device, run.info.world_size, len(micro_batches)
    lr = run.schedule.apply(run.optimizer, run.state.step)  # cosine with warmup, per iteration
    if run.masks is not None and run.masks.at(run.state.step):  # MSG: m = 1, the mask is done
        run.masks.remove()
        run.masks = None
    # The alpha schedule's factor (issue 13): at 0 L_IFD is off and the teacher need not run.
    factor = run.distiller.factor(run.state.step) if run.distiller is not None else 0.0
    # A global task loss (CLIP's gathered contrastive loss) is the same on every rank but its graph
    # reaches only the rank's own features (compt.engine.dist.gather_with_local_grad); DDP *averages*
    # gradients over ranks, so it is scaled by the world size to make that average the true gradient.
    task_scale = world if run.paradigm.task_loss_is_global else 1
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = tuple(x.to(device, non_blocking=True) for x in batch)
        # DDP all-reduces gradients only on the last micro-batch of the step.
        sync = run.forward.no_sync() if world > 1 and i < n - 1 else nullcontext()
        with sync:
            with run.autocast():
                out = run.forward(*batch)
                task = run.paradigm.task_loss(out, run.local_batch_size)
                parts = {"loss_task": task}
                if factor > 0:
                    # The frozen teacher sees the same batch, at the same precision.
                    teacher = run.distiller.teacher_features(batch)
                    if run.distiller.gate:  # the teacher's L_task on this batch, for the gate
                        parts["loss_teacher"] = run.distiller.teacher_task_loss(
                            teacher, out, run.local_batch_size
                        )
                    ifd = run.distiller.loss(
                        out["distill"], teacher, task, parts.get("loss_teacher"), factor
                    )  # Eq. 1
                    parts["loss_ifd"] = ifd.pop("loss")
                    stats["alpha"] = ifd.pop("alpha")
                    parts.update(ifd)  # mse_<feature>, distill_on (logged as the fraction of micro-batches)
                elif run.distiller is not None:  # scheduled off: the log keeps its columns
                    parts["loss_ifd"] = stats["alpha"] = torch.zeros((), device=device)
            objective = (task * task_scale + parts.get("loss_ifd", 0.0)) / n  # Eq. 4; L_IFD: a per-rank mean
            if run.scaler is not None:
                run.scaler.scale(objective).backward()
            else:
                objective.backward()
        for key, value in parts.items():
            stats[key] = stats.get(key, 0.0) + value.detach() / n
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    if run.cfg.grad_clip > 0:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip).detach()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skipped when fp16 gradients overflowed
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    stats.update(run.paradigm.after_step(run.model))  # e.g. CLIP's temperature clamp
    stats["loss"] = stats["loss_task"] + stats.get("loss_ifd", 0.0)
    stats["lr"] = torch.tensor(lr)
    # Remember the first step whose loss was not finite, without a host sync (read at log/save time).
    bad = ~torch.isfinite(stats["loss"])
    run.first_bad_step = torch.where(bad & (run.first_bad_step < 0), run.state.step, run.first_bad_step)
    return stats


def _advance(run: _Run) -> None:
    """Count the step just taken: data position, samples and training MACs (App. C.2)."""
    st = run.state
    teacher_ran = run.distiller is not None and run.distiller.factor(st.step) > 0
    st.step += 1
    st.samples_seen += run.cfg.global_batch_size
    st.train_macs += run.macs_per_step - (0 if teacher_ran else run.teacher_macs_per_step)
    st.step_in_epoch += 1
    if st.step_in_epoch >= run.data.steps_per_epoch:
        st.epoch, st.step_in_epoch = st.epoch + 1, 0


# --- the loop ------------------------------------------------------------------------------------


def train_member(
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    should_stop: Callable[[dict[str, float]], bool] | None = None,
    retrain: bool = False,
) -> TrainResult:
    """Train one member (a baseline, or a chain link when ``cfg.teacher`` is set) and return its result.

    ``evaluate(model, step)`` runs on rank 0 with the plain student in eval mode every
    ``cfg.eval_every_steps`` and after the last step; its metrics go to ``metrics.jsonl`` and
    :attr:`TrainResult.metrics`. ``should_stop(metrics) -> True`` ends the run early (``final.pt`` is
    written as usual). Pass the same callbacks on every rank. Rerunning with the same ``out_dir``
    resumes from the newest valid ``step_*.pt``; a run whose ``final.pt`` exists returns at once.
    A folder holding a run of another config is an error naming the change, unless ``retrain``,
    which moves it aside (``<out_dir>.replaced-<N>``) and trains afresh. Another process training
    in the same folder is an error too (:mod:`compt.engine.lock`).

    Raises :class:`NonFiniteLossError` when the loss turns NaN/inf (no checkpoint is written after
    it) and :class:`TrainingInterrupted` (a ``SystemExit``) after saving on SIGTERM or SIGINT.
    """
    check_writable(cfg.out_dir, "train.out_dir")  # now, not at the first checkpoint
    info = dist.init_distributed(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    run = None
    try:
        with hold(cfg.out_dir):  # one run per folder (issue 11); rank 0 holds it for the job
            done = dist.run_on_main(lambda: _reuse_finished(cfg, retrain))
            if done is not None:
                return done
            run = _setup(cfg, info)
            with stop_on_signals(run, run.out_dir / "final.pt"):
                return _loop(run, evaluate, should_stop)
    finally:
        if run is not None:
            run.log.close()
        torch.use_deterministic_algorithms(was_deterministic)
        dist.teardown(info)


def _reuse_finished(cfg: TrainConfig, retrain: bool) -> TrainResult | None:
    """The result of a finished run of ``cfg`` in its out_dir, else None (rank 0; see check_prior_run)."""
    payload = check_prior_run(cfg, retrain)
    if payload is None:
        return None
    final = Path(cfg.out_dir) / "final.pt"
    _LOG.info("%s: trained before (%s), with this config; not training again", cfg.member, final)
    return _result(final, payload)


def _loop(run: _Run, evaluate, should_stop) -> TrainResult:
    """nanoGPT-style: boundary work (log, eval, save) then one step, until the step after the last."""
    cfg, st = run.cfg, run.state
    has_eval = dist.broadcast_object(evaluate is not None)  # every rank must join the same collectives
    start, stats, metrics = st.step, None, {}
    while True:
        fresh = st.step > start  # the resume point's boundary work was done before the interruption
        last = st.step >= run.total_steps
        at_log = fresh and (st.step % cfg.log_every_steps == 0 or last)
        if at_log:
            log_step(run, stats)
        at_eval = fresh and cfg.eval_every_steps > 0 and st.step % cfg.eval_every_steps == 0
        if has_eval and (last or at_eval):
            try:
                metrics, stop_early = evaluate_now(run, evaluate, should_stop)
            except Exception:
                _save_before_raising(run)
                raise
            if stop_early and not last:
                last = True
                if not at_log:
                    log_step(run, stats)
        if last:
            return _finish(run, metrics)
        at_save = fresh and cfg.save_every_steps > 0 and st.step % cfg.save_every_steps == 0
        stop = stop_agreed(run, sync_point=at_log or at_save)
        if at_save or stop:
            check_finite(run)  # never save weights that a NaN step has touched
            path = save_run(run, run.out_dir / f"step_{st.step}.pt")
        if stop:
            msg = f"stopped by {signal_name(stop)} at step {st.step}; saved {path}; "
            msg += "rerun the same command to resume"
            _LOG.warning(msg)
            raise TrainingInterrupted(msg, path, stop)
        stats = _train_step(run, run.data.next())
        _advance(run)
        run.log.heartbeat(st.step, st.wall_s + time.perf_counter() - run.clock)


def _save_before_raising(run: _Run) -> None:
    """The evaluation failed (e.g. an eval folder went missing): keep the steps trained so far.

    Before final.pt the last checkpoint may be far behind (issue 11: an ImageFolder error after
    the last step lost the whole member); a rerun resumes here and only evaluates again.
    """
    check_finite(run)
    path = save_run(run, run.out_dir / f"step_{run.state.step}.pt")
    _LOG.error(
        "%s: the evaluation at step %d failed; saved %s. Fix the cause and rerun the same command: the "
        "run resumes there and evaluates again", run.cfg.member, run.state.step, path,
    )  # fmt: skip


# --- setup ---------------------------------------------------------------------------------------


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether to use a grad scaler)."""
    name = cfg.precision
    if name == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError(
            "train.precision=fp16 needs a CUDA device (and its grad scaler); use fp32 or bf16 on CPU"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], name == "fp16"


def _warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Table C's warmup (8000 steps, 1000 for a link), at most a tenth of a shorter run."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    paper = PAPER_WARMUP_STEPS["link" if cfg.teacher else "baseline"]
    if paper > total_steps // 10:
        _LOG.info(
            "warmup: the paper's %d steps exceed 10%% of this %d-step run; using %d",
            paper,
            total_steps,
            max(1, total_steps // 10),
        )
    return min(paper, max(1, total_steps // 10))


@dataclass
class _Link:
    """What a chain link adds to a run (built by :func:`_build_link`)."""

    distiller: Distiller
    projection: nn.Module
    info: dict[str, Any]  # teacher checkpoint and member, for the log and checkpoints
    teacher_macs: int  # the teacher's forward MACs per sample
    masks: GrowthMask | None = None  # MSG growth masks (width "msg", at step 0)
    moments: dict[str, dict[str, Any]] | None = None  # grown AdamW moments (optimizer_init "grown", step 0)


def _build_link(
    cfg: TrainConfig,
    member: Member,
    student: nn.Module,
    grow_now: bool,
    device: torch.device,
    total_steps: int,
) -> _Link:
    """Teacher, projection T and cost of a chain link; at step 0 grows the student (and, if asked, its
    AdamW moments) from the teacher."""
    teacher, payload, t_member = load_teacher(cfg.teacher, member)
    digest = checkpoint_digest(cfg.teacher)  # a teacher retrained later makes this link stale
    masks = moments = None
    if grow_now:  # on resume the checkpoint already holds the grown (and trained) weights
        if cfg.optimizer_init == "grown":  # first: a teacher without moments fails before any work
            moments = grow_moments(payload, student, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
        report = grow(payload, student, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
        _LOG.info("grew %s from %s: %s", member.name, t_member.name, report.format())
        masks = report.masks
        if masks is not None:
            masks.ramp_steps = max(1, round(cfg.mask_ramp_fraction * total_steps))
    paradigm = member.paradigm
    projection = make_projection(paradigm.feature_dim(member), paradigm.feature_dim(t_member))
    distiller = Distiller(
        teacher.to(device),
        paradigm,
        cfg.alpha,
        cfg.alpha_ratio,
        cfg.distill_gate,
        ref_dim=cfg.alpha_ref_dim,
        schedule=cfg.alpha_schedule,
        fraction=cfg.alpha_schedule_fraction,
        total_steps=total_steps,
    )
    teacher_macs = member_cost(t_member, **paradigm.cost_sample(cfg.data)).forward_macs
    info = {"checkpoint": str(cfg.teacher), "member": t_member.name, "sha256": digest}
    return _Link(distiller, projection, info, teacher_macs, masks, moments)


def _configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":  # TF32 for the fp32 parts of AMP: A100-class speed, ample precision for CLIP
        torch.set_float32_matmul_precision("high")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def _setup(cfg: TrainConfig, info: dist.DistInfo) -> _Run:
    """Build the student (grown for a link), teacher, optimizer, data and log; restore a checkpoint."""
    member, device = get_member(cfg.member, cfg.family), info.device
    paradigm = member.paradigm
    amp_dtype, use_scaler = _precision(cfg, device)
    _configure_torch(cfg, device)
    state = TrainState()
    data = DataStream(cfg, member, info, state)
    total_steps = cfg.steps or run_steps(cfg.epochs, data.steps_per_epoch)  # as compt plan counts them
    resume_from = latest_checkpoint(cfg.out_dir)
    seed_all(cfg.seed)  # the same initial student (and growth) on every rank
    model = member.create()
    link = None
    if cfg.teacher is not None:
        link = _build_link(cfg, member, model, resume_from is None, device, total_steps)
    projection = link.projection if link else nn.Identity()
    model.to(device).train()
    projection.to(device)
    eps = cfg.eps or paradigm.default_eps(member)
    params = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=eps, device=device)
    optimizer = build_optimizer([model, projection], **params)
    if link and link.moments:  # staged training: the teacher's moments, grown with its weights
        load_moments(optimizer, model, link.moments)
    warmup = _warmup_steps(cfg, total_steps)
    schedule = CosineSchedule(cfg.lr, total_steps, warmup, cfg.min_lr_ratio, cfg.lr_decay_fraction)
    cost = member_cost(member, **paradigm.cost_sample(cfg.data))
    teacher_macs_per_step = cfg.global_batch_size * (link.teacher_macs if link else 0)
    macs_per_step = cfg.global_batch_size * cost.train_macs + teacher_macs_per_step + cost.update_macs
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    run = _Run(cfg=cfg, info=info, member=member, paradigm=paradigm, model=model, projection=projection,
               forward=None,
               distiller=link and link.distiller, optimizer=optimizer, schedule=schedule, scaler=scaler,
               amp_dtype=amp_dtype, data=data, log=None, total_steps=total_steps, state=state,
               macs_per_step=macs_per_step, teacher_info=link and link.info,
               teacher_macs_per_step=teacher_macs_per_step, masks=link and link.masks)  # fmt: skip
    if resume_from is not None:
        restore_run(run, resume_from)  # the growth masks too, if the checkpoint was taken mid-ramp
    else:
        seed_all(cfg.seed + info.rank)  # per-rank streams for anything random during training
    if run.masks is not None:  # after the optimizer and the restore: both see the plain parameters
        run.masks.install(model)
    run.forward = _wrap(paradigm.student(model, projection), cfg, info)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    run.log = RunLog(cfg.out_dir, enabled=info.is_main, member=member.name, total_steps=total_steps,
                     steps_per_epoch=data.steps_per_epoch, batch_size=cfg.global_batch_size,
                     start_step=state.step, start_wall_s=state.wall_s)  # fmt: skip
    _announce(run, resume_from)
    run.clock = time.perf_counter()
    return run


def _announce(run: _Run, resume_from: Path | None) -> None:
    """The ``start`` record, and a line saying what trains (or where it resumed) for the job's log."""
    cfg, st, name = run.cfg, run.state, run.member.name
    precision = str(run.amp_dtype or "fp32")
    start = {"kind": "start", "step": st.step, "member": name, "teacher": run.teacher_info}
    start |= {"world_size": run.info.world_size, "device": str(run.info.device), "precision": precision}
    start |= {"total_steps": run.total_steps, "steps_per_epoch": run.data.steps_per_epoch}
    start |= {"warmup_steps": run.schedule.warmup_steps, "macs_per_step": run.macs_per_step}
    run.log.write(start | {"resumed_from": resume_from and str(resume_from), "config": to_dict(cfg)})
    if resume_from is not None:
        _LOG.info("%s: resumed from %s at step %d/%d (epoch %d)", name, resume_from, st.step, run.total_steps,
                  st.epoch)  # fmt: skip
        return
    teacher = f", teacher {run.teacher_info['member']}" if run.teacher_info else ""
    epochs = run.total_steps / run.data.steps_per_epoch
    _LOG.info("%s: training %d steps (%.4g epochs of %d), global batch %d, %s on %s x %d%s", name,
              run.total_steps, epochs, run.data.steps_per_epoch, cfg.global_batch_size, precision,
              run.info.device.type, run.info.world_size, teacher)  # fmt: skip


def _wrap(forward: nn.Module, cfg: TrainConfig, info: dist.DistInfo) -> nn.Module:
    """torch.compile and DDP around the student's forward (the teacher is never wrapped)."""
    if cfg.compile:
        forward = torch.compile(forward)
    if info.world_size > 1:
        cuda = info.device.type == "cuda"
        forward = DistributedDataParallel(forward, device_ids=[info.device.index] if cuda else None,
                                          broadcast_buffers=False, gradient_as_bucket_view=True)  # fmt: skip
    return forward


# --- checkpoints ---------------------------------------------------------------------------------


def _finish(run: _Run, metrics: dict[str, float]) -> TrainResult:
    """Write final.pt (the trained student, its cost and config) and return the result."""
    check_finite(run)
    run.tick()
    if run.masks is not None:  # stopped before the MSG ramp ended: fold the masks into the weights
        warnings.warn(
            f"{run.cfg.member} stopped at step {run.state.step}, before its growth masks reached 1; "
            "final.pt holds the masked weights (exact but for the masked LayerNorm statistics)",
            stacklevel=2,
        )
        run.masks.remove(fold=True)
        run.masks = None
    final = run.out_dir / "final.pt"
    st, payload = run.state, model_payload(run) | {"metrics": metrics, "planned_steps": run.total_steps}
    if run.cfg.keep_moments:  # for a link that grows its optimizer state from this member's
        payload["moments"] = moments_by_name(run.optimizer, run.model)
    if run.info.is_main:
        save_checkpoint(final, payload)
        record = {"kind": "final", "step": st.step, "samples_seen": st.samples_seen}
        run.log.write(record | {"train_macs": st.train_macs, "wall_s": st.wall_s, "checkpoint": str(final)})
        _LOG.info(
            "%s: finished %d steps, %.1f s of training -> %s", run.cfg.member, st.step, st.wall_s, final
        )
    dist.barrier()
    return _result(final, payload)


def _result(path: Path, payload: dict[str, Any]) -> TrainResult:
    """The TrainResult of a final.pt payload (also for a run finished earlier)."""
    return TrainResult(
        final_checkpoint=path,
        train_macs=int(payload["train_macs"]),
        wall_s=float(payload["wall_s"]),
        steps=int(payload["steps"]),
        samples_seen=int(payload["samples_seen"]),
        metrics=dict(payload.get("metrics") or {}),
        planned_steps=int(payload.get("planned_steps", payload["steps"])),
    )
