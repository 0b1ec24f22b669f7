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

import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compt.config import from_dict, to_dict
from compt.cost import member_cost
from compt.distill import DEFAULT_ALPHA, DEFAULT_RATIO, Distiller, load_teacher, make_projection
from compt.engine import dist, fsdp
from compt.engine.checkpoint import (
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from compt.engine.optim import PAPER_WARMUP_STEPS, CosineSchedule, build_optimizer
from compt.engine.resume import DataStream, gather_states, model_payload, restore_run, save_run, seed_all
from compt.engine.runlog import NonFiniteLossError, RunLog, check_finite, evaluate_now, log_step
from compt.families import Member, get_member
from compt.grow import grow
from compt.paradigms import Paradigm

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "train_member",
]

_LOG = logging.getLogger("compt.train")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp2")


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
    distill_gate: bool = False  # beyond the paper: no L_IFD on steps where student L_task < teacher L_task
    distill: str = "feature"  # what a link distills: "feature" (Eq. 1, through T) or "logit" (LM: KL)
    device: str = "auto"  # auto (this rank's GPU if any, else CPU) | cpu | cuda | cuda:K
    parallel: str = "ddp"  # several processes: "ddp" (replicas) or "fsdp2" (fully_shard per block)

    def __post_init__(self) -> None:
        # An unknown member fails here, naming the nearest one; its paradigm reads the data config.
        paradigm = get_member(self.member, self.family).paradigm
        data_config = paradigm.data_config
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", from_dict(data_config, self.data, where="train.data"))
        if not isinstance(self.data, data_config):
            raise ValueError(
                f"train.data must be a {data_config.__module__}.{data_config.__name__} (or its fields as a "
                f"mapping) for member {self.member}, got {type(self.data).__name__}"
            )
        object.__setattr__(self, "data", paradigm.bind_data(self.data, self.out_dir))
        gate_ok = not self.distill_gate or type(paradigm).teacher_task_loss is not Paradigm.teacher_task_loss
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
                "distill",
                self.distill in paradigm.distill_targets,
                f"must be one of {', '.join(paradigm.distill_targets)} for a {paradigm.name} member",
            ),
            ("distill_gate", gate_ok, f"is not available for the {paradigm.name} paradigm; set it to false"),
            ("parallel", self.parallel in PARALLEL, f"must be one of {', '.join(PARALLEL)}"),
            ("compile", not (self.compile and self.parallel == "fsdp2"), "is not supported with fsdp2 yet"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"train.{name} {why} (got {getattr(self, name)!r})")
        if not isinstance(self.alpha, str):
            object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


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


class TrainingInterrupted(SystemExit):
    """SIGTERM arrived: a checkpoint was written at the step boundary; rerun the same command to resume."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(143)  # 128 + SIGTERM, the exit status schedulers expect from a terminated job
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        return self.message


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
    stop_requested: bool = False
    clock: float = field(default_factory=time.perf_counter)
    first_bad_step: torch.Tensor | None = None  # on device; -1 while every loss so far was finite
    sharded: bool = False  # FSDP2 (compt.engine.fsdp): `forward` holds the shards of model and T

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

    def eval_model(self) -> nn.Module | None:
        """The plain student to evaluate on rank 0 (under FSDP2 a gathered copy; a collective)."""
        if not self.sharded:
            return self.model
        return fsdp.plain_copy(self.forward, self.member.create, self.info.device)

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
    # A global task loss (CLIP's gathered contrastive loss) is the same on every rank but its graph
    # reaches only the rank's own features (compt.engine.dist.gather_with_local_grad); DDP *averages*
    # gradients over ranks, so it is scaled by the world size to make that average the true gradient.
    task_scale = world if run.paradigm.task_loss_is_global else 1
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = tuple(x.to(device, non_blocking=True) for x in batch)
        # DDP all-reduces (FSDP2 reduce-scatters) gradients only on the last micro-batch of the step.
        sync = _no_sync(run) if world > 1 and i < n - 1 else nullcontext()
        with sync:
            with run.autocast():
                out = run.forward(*batch)
                task = run.paradigm.task_loss(out, run.local_batch_size)
                parts = {"loss_task": task}
                if run.distiller is not None:
                    # The frozen teacher sees the same batch, at the same precision.
                    teacher = run.distiller.teacher_features(batch)
                    if run.distiller.gate:  # the teacher's L_task on this batch, for the gate
                        parts["loss_teacher"] = run.distiller.teacher_task_loss(
                            teacher, out, run.local_batch_size
                        )
                    ifd = run.distiller.loss(
                        out["distill"], teacher, task, parts.get("loss_teacher")
                    )  # Eq. 1
                    parts["loss_ifd"] = ifd.pop("loss")
                    stats["alpha"] = ifd.pop("alpha")
                    parts.update(ifd)  # mse_<feature>, distill_on (logged as the fraction of micro-batches)
            objective = (task * task_scale + parts.get("loss_ifd", 0.0)) / n  # Eq. 4; L_IFD: a per-rank mean
            if run.scaler is not None:
                run.scaler.scale(objective).backward()
            else:
                objective.backward()
        for key, value in parts.items():
            stats[key] = stats.get(key, 0.0) + value.detach() / n
    if run.sharded:
        fsdp.reduce_replicated_grads(run.forward)  # parameters fully_shard cannot take (CLIP's logit_scale)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    if run.cfg.grad_clip > 0:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        clip = fsdp.clip_grad_norm if run.sharded else torch.nn.utils.clip_grad_norm_
        stats["grad_norm"] = clip(params, run.cfg.grad_clip).detach()
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


@contextmanager
def _no_sync(run: _Run):
    """No gradient communication for this micro-batch (gradient accumulation), under DDP or FSDP2."""
    if not run.sharded:
        with run.forward.no_sync():
            yield
        return
    run.forward.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        run.forward.set_requires_gradient_sync(True)


def _advance(run: _Run) -> None:
    """Count the step just taken: data position, samples and training MACs (App. C.2)."""
    st = run.state
    st.step += 1
    st.samples_seen += run.cfg.global_batch_size
    st.train_macs += run.macs_per_step
    st.step_in_epoch += 1
    if st.step_in_epoch >= run.data.steps_per_epoch:
        st.epoch, st.step_in_epoch = st.epoch + 1, 0


# --- the loop ------------------------------------------------------------------------------------


def train_member(
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    should_stop: Callable[[dict[str, float]], bool] | None = None,
) -> TrainResult:
    """Train one member (a baseline, or a chain link when ``cfg.teacher`` is set) and return its result.

    ``evaluate(model, step)`` runs on rank 0 with the plain student in eval mode every
    ``cfg.eval_every_steps`` and after the last step; its metrics go to ``metrics.jsonl`` and
    :attr:`TrainResult.metrics`. ``should_stop(metrics) -> True`` ends the run early (``final.pt`` is
    written as usual). Pass the same callbacks on every rank. Rerunning with the same ``out_dir``
    resumes from the newest valid ``step_*.pt``; a run whose ``final.pt`` exists returns at once.

    Raises :class:`NonFiniteLossError` when the loss turns NaN/inf (no checkpoint is written after
    it) and :class:`TrainingInterrupted` (a ``SystemExit``) after saving on SIGTERM.
    """
    final = Path(cfg.out_dir) / "final.pt"
    if final.is_file():
        if verify_checkpoint(final):
            return _result(final, load_checkpoint(final))
        warnings.warn(
            f"{final} is corrupted or truncated (SHA-256 mismatch); resuming from the newest valid "
            "step checkpoint to write it again",
            stacklevel=2,
        )
    check_writable(cfg.out_dir, "train.out_dir")  # now, not at the first checkpoint
    info = dist.init_distributed(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    run = None
    try:
        run = _setup(cfg, info)
        with _save_on_sigterm(run):
            return _loop(run, evaluate, should_stop)
    finally:
        if run is not None:
            run.log.close()
        torch.use_deterministic_algorithms(was_deterministic)
        dist.teardown(info)


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
            metrics, stop_early = evaluate_now(run, evaluate, should_stop)
            if stop_early and not last:
                last = True
                if not at_log:
                    log_step(run, stats)
        if last:
            return _finish(run, metrics)
        at_save = fresh and cfg.save_every_steps > 0 and st.step % cfg.save_every_steps == 0
        stop = _stop_agreed(run, sync_point=at_log or at_save)
        if at_save or stop:
            check_finite(run)  # never save weights that a NaN step has touched
            path = save_run(run, run.out_dir / f"step_{st.step}.pt")
        if stop:
            msg = f"stopped by SIGTERM at step {st.step}; saved {path}; rerun the same command to resume"
            _LOG.warning(msg)
            raise TrainingInterrupted(msg, path)
        stats = _train_step(run, run.data.next())
        _advance(run)


def _stop_agreed(run: _Run, sync_point: bool) -> bool:
    """Whether SIGTERM arrived; ranks agree at log/save steps (a collective), a lone process every step."""
    if run.info.world_size == 1:
        return run.stop_requested
    if not sync_point:
        return False
    flag = torch.tensor(float(run.stop_requested), device=run.info.device)
    return bool(dist.all_reduce_max(flag).item())


@contextmanager
def _save_on_sigterm(run: _Run):
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        run.stop_requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if run.stop_requested:  # arrived during the last boundary (final eval/save): final.pt is written,
        # but a caller such as the chain would go on to train the next member; stop here instead.
        final = run.out_dir / "final.pt"
        msg = f"stopped by SIGTERM after {run.cfg.member} finished ({final}); rerun the same command"
        _LOG.warning(msg)
        raise TrainingInterrupted(msg, final)


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


def _build_link(cfg: TrainConfig, member: Member, student: nn.Module, grow_now: bool, device: torch.device):
    """Teacher, projection T and cost of a chain link; grows the student from the teacher at step 0."""
    teacher, payload, t_member = load_teacher(cfg.teacher, member)
    paradigm = member.paradigm
    paradigm.check_teacher(payload, cfg.data, str(cfg.teacher))  # e.g. the same tokenizer
    if grow_now:  # on resume the checkpoint already holds the grown (and trained) weights
        report = grow(payload, student, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
        _LOG.info("grew %s from %s: %s", member.name, t_member.name, report.format())
    if cfg.distill == "feature":  # T maps the student's features to the teacher's width (Eq. 1)
        projection = make_projection(paradigm.feature_dim(member), paradigm.feature_dim(t_member))
    else:  # a logit target compares one shared output space
        projection = nn.Identity()
    distiller = Distiller(
        teacher.to(device), paradigm, cfg.alpha, cfg.alpha_ratio, gate=cfg.distill_gate, target=cfg.distill
    )
    teacher_macs = member_cost(t_member, **paradigm.cost_sample(cfg.data)).forward_macs
    return distiller, projection, {"checkpoint": str(cfg.teacher), "member": t_member.name}, teacher_macs


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
    total_steps = cfg.steps or max(1, round(cfg.epochs * data.steps_per_epoch))
    resume_from = latest_checkpoint(cfg.out_dir)
    seed_all(cfg.seed)  # the same initial student (and growth) on every rank
    model = member.create()
    sharded = cfg.parallel == "fsdp2" and info.world_size > 1
    distiller, projection, teacher_info, teacher_macs = None, nn.Identity(), None, 0
    if cfg.teacher is not None:  # FSDP2: the one full copy grows on rank 0, the shards load it below
        grow_now = resume_from is None and (info.is_main or not sharded)
        link = _build_link(cfg, member, model, grow_now=grow_now, device=device)
        distiller, projection, teacher_info, teacher_macs = link
    model.to(device).train()
    projection.to(device)
    student = paradigm.student(model, projection, cfg.distill)
    if sharded:  # before the optimizer sees the parameters: sharding replaces them with DTensors
        parts = (("model", model), ("projection", projection)) if info.is_main else ()
        full = {p: {k: v.detach().clone() for k, v in m.state_dict().items()} for p, m in parts}
        fsdp.shard(student, paradigm.shard_units(model), device, amp_dtype)
        if resume_from is None:  # rank 0's (grown) student on every rank; a resume loads the checkpoint
            fsdp.broadcast_from_rank0(student, full)
    eps = cfg.eps or paradigm.default_eps(member)
    params = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=eps, device=device)
    optimizer = build_optimizer([model, projection], **params)
    schedule = CosineSchedule(cfg.lr, total_steps, _warmup_steps(cfg, total_steps), cfg.min_lr_ratio)
    cost = member_cost(member, **paradigm.cost_sample(cfg.data))
    macs_per_step = cfg.global_batch_size * (cost.train_macs + teacher_macs) + cost.update_macs
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    run = _Run(cfg=cfg, info=info, member=member, paradigm=paradigm, model=model, projection=projection,
               forward=student, sharded=sharded,
               distiller=distiller, optimizer=optimizer, schedule=schedule, scaler=scaler,
               amp_dtype=amp_dtype, data=data, log=None, total_steps=total_steps, state=state,
               macs_per_step=macs_per_step, teacher_info=teacher_info)  # fmt: skip
    if resume_from is not None:
        restore_run(run, resume_from)
        _LOG.info("resumed %s at step %d (epoch %d)", resume_from, state.step, state.epoch)
    else:
        seed_all(cfg.seed + info.rank)  # per-rank streams for anything random during training
    run.forward = _wrap(student, cfg, info, sharded)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    run.log = RunLog(cfg.out_dir, enabled=info.is_main, total_steps=total_steps, start_step=state.step,
                     start_wall_s=state.wall_s)  # fmt: skip
    start = {"kind": "start", "step": state.step, "member": member.name, "teacher": teacher_info}
    start |= {"world_size": info.world_size, "device": str(device), "precision": str(amp_dtype or "fp32")}
    start |= {"parallel": cfg.parallel if info.world_size > 1 else None}
    start |= {"total_steps": total_steps, "steps_per_epoch": data.steps_per_epoch}
    start |= {"warmup_steps": schedule.warmup_steps, "macs_per_step": macs_per_step}
    run.log.write(start | {"resumed_from": resume_from and str(resume_from), "config": to_dict(cfg)})
    run.clock = time.perf_counter()
    return run


def _wrap(forward: nn.Module, cfg: TrainConfig, info: dist.DistInfo, sharded: bool) -> nn.Module:
    """torch.compile and DDP around the student's forward (the teacher is never wrapped); an FSDP2
    student is already sharded."""
    if cfg.compile:
        forward = torch.compile(forward)
    if info.world_size > 1 and not sharded:
        cuda = info.device.type == "cuda"
        forward = DistributedDataParallel(forward, device_ids=[info.device.index] if cuda else None,
                                          broadcast_buffers=False, gradient_as_bucket_view=True)  # fmt: skip
    return forward


# --- checkpoints ---------------------------------------------------------------------------------


def _finish(run: _Run, metrics: dict[str, float]) -> TrainResult:
    """Write final.pt (the trained student, its cost and config) and return the result."""
    check_finite(run)
    run.tick()
    final = run.out_dir / "final.pt"
    st, payload = run.state, model_payload(run, gather_states(run))
    payload |= {"metrics": metrics, "planned_steps": run.total_steps}
    if run.info.is_main:
        save_checkpoint(final, payload)
        record = {"kind": "final", "step": st.step, "samples_seen": st.samples_seen}
        run.log.write(record | {"train_macs": st.train_macs, "wall_s": st.wall_s, "checkpoint": str(final)})
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
