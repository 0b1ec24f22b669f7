"""Building one run (a baseline member or a chain link) before its first step, and the run object.

:func:`build_run` makes the student (grown from its teacher for a link: inverse weight initialization,
§3.1.1), the teacher and its distiller (Eq. 1), the optimizer and schedule (Table C), the data stream
and the log, and restores a checkpoint when the folder holds one; :class:`Run` is everything the
loop (:mod:`compt.engine.train`) then holds. Nothing here knows a paradigm by name.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compt.config import to_dict
from compt.cost import member_cost, run_steps
from compt.distill import Distiller, load_teacher, make_projection
from compt.engine import dist, fsdp
from compt.engine.checkpoint import checkpoint_digest, latest_checkpoint, load_checkpoint
from compt.engine.config import TrainConfig, check_schedule, precision_of
from compt.engine.optim import PAPER_WARMUP_STEPS, CosineSchedule, build_optimizer, load_moments
from compt.engine.progressive_train import ProgressiveTraining
from compt.engine.resume import DataStream, restore_run, seed_all
from compt.engine.runlog import RunLog
from compt.families import Member, get_member
from compt.grow import grow, grow_moments
from compt.grow.masks import GrowthMask
from compt.paradigms import Paradigm

__all__ = ["TrainState", "Run", "build_run", "configure_torch"]

_LOG = logging.getLogger("compt.train")


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


@dataclass
class Run:
    """Everything one run holds while it trains (built by :func:`build_run`)."""

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
    progressive: ProgressiveTraining | None = None  # AutoProg-One's stages (train.progressive), else None
    stop_signal: int = 0  # SIGTERM/SIGINT received (compt.engine.interrupt); 0: none
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

    def eval_model(self) -> nn.Module:
        """The plain student to evaluate on rank 0 (under FSDP2 a gathered copy; a collective)."""
        if not self.sharded:
            return self.model
        return fsdp.plain_copy(self.forward, self.member.create, self.info.device)

    def tick(self) -> None:
        """Advance the training wall clock to now."""
        now = time.perf_counter()
        self.state.wall_s += now - self.clock
        self.clock = now

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh AdamW over ``model`` and the projection T, with the run's settings (Table C)."""
        return build_optimizer([model, self.projection], **_adamw_settings(self.cfg, self.member, self.info))

    def wrap(self, find_unused: bool = False) -> None:
        """(Re)build the student forward around the current (unsharded) model: compiled, DDP-wrapped under
        torchrun (``find_unused``: some parameters get no gradient this step, e.g. an AutoProg sub-net's)."""
        student = self.paradigm.student(self.model, self.projection, self.cfg.distill)
        self.forward = _wrap(student, self.cfg, self.info, find_unused)


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
    loaded: tuple[nn.Module, dict[str, Any], Member],
) -> _Link:
    """Teacher, projection T and cost of a chain link (``loaded``: :func:`compt.distill.load_teacher`'s);
    at step 0 grows the student (and, if asked, its AdamW moments) from the teacher."""
    teacher, payload, t_member = loaded
    paradigm = member.paradigm
    paradigm.check_teacher(payload, cfg.data, str(cfg.teacher))  # e.g. the same tokenizer
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
    if cfg.distill == "feature":  # T maps the student's features to the teacher's width (Eq. 1)
        projection = make_projection(paradigm.feature_dim(member), paradigm.feature_dim(t_member))
    else:  # a logit target compares one shared output space
        projection = nn.Identity()
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
        target=cfg.distill,
    )
    teacher_macs = member_cost(t_member, **paradigm.cost_sample(cfg.data)).forward_macs
    info = {"checkpoint": str(cfg.teacher), "member": t_member.name, "sha256": digest}
    return _Link(distiller, projection, info, teacher_macs, masks, moments)


def configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls on CUDA and, if asked, deterministic algorithms (for any loop built on the engine)."""
    if device.type == "cuda":  # TF32 for the fp32 parts of AMP: A100-class speed, ample precision for CLIP
        torch.set_float32_matmul_precision("high")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def build_run(cfg: TrainConfig, info: dist.DistInfo) -> Run:
    """Build the student (grown for a link), teacher, optimizer, data and log; restore a checkpoint."""
    member, device = get_member(cfg.member, cfg.family), info.device
    paradigm = member.paradigm
    amp_dtype, use_scaler = precision_of(cfg, device)
    configure_torch(cfg, device)
    state = TrainState()
    data = DataStream(cfg, member, info, state)
    total_steps = cfg.steps or run_steps(cfg.epochs, data.steps_per_epoch)  # as compt plan counts them
    resume_from = latest_checkpoint(cfg.out_dir)
    payload = load_checkpoint(resume_from) if resume_from is not None else None
    seed_all(cfg.seed)  # the same initial student (and growth) on every rank
    model = member.create() if cfg.progressive is None else None
    sharded = cfg.parallel == "fsdp2" and info.world_size > 1  # never with AutoProg: TrainConfig refuses
    loaded = load_teacher(cfg.teacher, member) if cfg.teacher is not None else None
    progressive = _progressive(cfg, member, info, data, total_steps, loaded and loaded[2])
    if progressive is not None:  # its stage models are seeded on their own (a fork of the RNG)
        model = progressive.start() if payload is None else progressive.resume(payload["progressive"],
                                                                               payload["step"])  # fmt: skip
    link = None
    if loaded is not None:  # FSDP2: the one full copy grows on rank 0, the shards load it below
        grow_now = resume_from is None and (info.is_main or not sharded)
        link = _build_link(cfg, member, model, grow_now, device, total_steps, loaded)
    if progressive is not None and resume_from is None:
        progressive.reset_ema()  # MoGrow's average starts at the initial (for a link: grown) weights
    projection = link.projection if link else nn.Identity()
    model.to(device).train()
    projection.to(device)
    student = paradigm.student(model, projection, cfg.distill)
    if sharded:  # before the optimizer sees the parameters: sharding replaces them with DTensors
        parts = (("model", model), ("projection", projection)) if info.is_main else ()
        full = {p: {k: v.detach().clone() for k, v in m.state_dict().items()} for p, m in parts}
        fsdp.shard(student, paradigm.shard_units(model), device, amp_dtype)
        if resume_from is None:  # rank 0's (grown) student on every rank; a resume loads the checkpoint
            fsdp.broadcast_from_rank0(student, full)
    optimizer = build_optimizer([model, projection], **_adamw_settings(cfg, member, info))
    if link and link.moments:  # staged training: the teacher's moments, grown with its weights
        load_moments(optimizer, model, link.moments)
    warmup = _warmup_steps(cfg, total_steps)
    schedule = CosineSchedule(cfg.lr, total_steps, warmup, cfg.min_lr_ratio, cfg.lr_decay_fraction)
    cost = member_cost(member, **paradigm.cost_sample(cfg.data))
    teacher_macs_per_step = cfg.global_batch_size * (link.teacher_macs if link else 0)
    macs_per_step = cfg.global_batch_size * cost.train_macs + teacher_macs_per_step + cost.update_macs
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    run = Run(cfg=cfg, info=info, member=member, paradigm=paradigm, model=model, projection=projection,
               forward=student, sharded=sharded,
               distiller=link and link.distiller, optimizer=optimizer, schedule=schedule, scaler=scaler,
               amp_dtype=amp_dtype, data=data, log=None, total_steps=total_steps, state=state,
               macs_per_step=macs_per_step, teacher_info=link and link.info,
               teacher_macs_per_step=teacher_macs_per_step, masks=link and link.masks,
               progressive=progressive)  # fmt: skip
    if resume_from is not None:
        restore_run(run, resume_from, payload)  # the growth masks too, if the checkpoint was taken mid-ramp
    else:
        seed_all(cfg.seed + info.rank)  # per-rank streams for anything random during training
    if run.masks is not None:  # after the optimizer and the restore: both see the plain parameters
        run.masks.install(model)
    if sharded:
        run.forward = student  # FSDP2 is its own wrapper (TrainConfig refuses compile with it)
    else:
        run.wrap()  # an AutoProg search re-wraps it before its first step (compt.engine.progressive_train)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    run.log = RunLog(cfg.out_dir, enabled=info.is_main, member=member.name, total_steps=total_steps,
                     steps_per_epoch=data.steps_per_epoch, batch_size=cfg.global_batch_size,
                     start_step=state.step, start_wall_s=state.wall_s)  # fmt: skip
    _announce(run, resume_from)
    run.clock = time.perf_counter()
    return run


def _adamw_settings(cfg: TrainConfig, member: Member, info: dist.DistInfo) -> dict[str, Any]:
    eps = cfg.eps or member.paradigm.default_eps(member)
    return dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=eps, device=info.device)


def _progressive(
    cfg: TrainConfig,
    member: Member,
    info: dist.DistInfo,
    data: DataStream,
    total_steps: int,
    teacher: Member | None,
) -> ProgressiveTraining | None:
    """AutoProg-One's stages for this run (``train.progressive``), checked against its steps and data."""
    if cfg.progressive is None:
        return None
    check_schedule(cfg, total_steps, data.steps_per_epoch * cfg.accum_steps)
    return ProgressiveTraining(cfg.progressive, member, total_steps, seed=cfg.seed, device=info.device,
                               batch_size=cfg.global_batch_size, micro_batch_size=data.micro_batch,
                               sample=member.paradigm.cost_sample(cfg.data), teacher=teacher)  # fmt: skip


def _announce(run: Run, resume_from: Path | None) -> None:
    """The ``start`` record, and a line saying what trains (or where it resumed) for the job's log."""
    cfg, st, name = run.cfg, run.state, run.member.name
    precision = str(run.amp_dtype or "fp32")
    start = {"kind": "start", "step": st.step, "member": name, "teacher": run.teacher_info}
    start |= {"world_size": run.info.world_size, "device": str(run.info.device), "precision": precision}
    start |= {"parallel": cfg.parallel if run.info.world_size > 1 else None}
    start |= {"total_steps": run.total_steps, "steps_per_epoch": run.data.steps_per_epoch}
    start |= {"warmup_steps": run.schedule.warmup_steps, "macs_per_step": run.macs_per_step}
    if run.progressive is not None:
        start["progressive"] = run.progressive.describe()
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


def _wrap(forward: nn.Module, cfg: TrainConfig, info: dist.DistInfo, find_unused: bool = False) -> nn.Module:
    """torch.compile and DDP around the student's forward (the teacher is never wrapped)."""
    if cfg.compile:
        forward = torch.compile(forward)
    if info.world_size > 1:
        cuda = info.device.type == "cuda"
        forward = DistributedDataParallel(forward, device_ids=[info.device.index] if cuda else None,
                                          broadcast_buffers=False, gradient_as_bucket_view=True,
                                          find_unused_parameters=find_unused)  # fmt: skip
    return forward
