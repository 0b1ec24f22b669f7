"""What one training run of one member is: :class:`TrainConfig` (App. B.1, Table C), validated in full.

A frozen dataclass, loaded from YAML or built from the CLI by :mod:`compt.config` (did-you-mean
errors); ``__post_init__`` checks every field before anything is built, and :func:`check_runtime`
what this machine can run (a device, fp16's CUDA). The training loop is :mod:`compt.engine.train`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from compt.config import from_dict
from compt.distill import DEFAULT_ALPHA, DEFAULT_RATIO, DEFAULT_REF_DIM, list_alpha_schedules
from compt.engine import dist
from compt.engine.progressive import Progression, ProgressiveConfig, growth_space
from compt.families import Member, get_member
from compt.grow import list_depth_strategies, list_width_strategies
from compt.paradigms import Paradigm

__all__ = [
    "TrainConfig",
    "PRECISIONS",
    "PARALLEL",
    "OPTIMIZER_INITS",
    "check_runtime",
    "check_schedule",
    "precision_of",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp2")  # several processes: replicas (DDP) or shards (FSDP2, compt.engine.fsdp)
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
    distill: str = "feature"  # what a link distills: "feature" (Eq. 1, through T) or "logit" (LM: KL)
    mask_ramp_fraction: float = 0.25  # width "msg": fraction of the run over which growth masks go 0 -> 1
    optimizer_init: str = "fresh"  # fresh AdamW (paper) | grown: the teacher's moments grown with weights
    keep_moments: bool = False  # final.pt also holds the AdamW moments (a teacher of a grown-moments link)
    lr_decay_fraction: float = 1.0  # the cosine reaches min_lr after this fraction of the post-warmup run
    device: str = "auto"  # auto (this rank's GPU if any, else CPU) | cpu | cuda | cuda:K
    parallel: str = "ddp"  # several processes: "ddp" (replicas) or "fsdp2" (fully_shard per block)
    # AutoProg-One (issue 15): grow the member while it trains, in depth and input resolution; None: off
    progressive: ProgressiveConfig | None = None

    def __post_init__(self) -> None:
        # An unknown member fails here, naming the nearest one; its paradigm reads the data config.
        member = get_member(self.member, self.family)
        paradigm = member.paradigm
        data_config = paradigm.data_config
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", from_dict(data_config, self.data, where="train.data"))
        if not isinstance(self.data, data_config):
            raise ValueError(
                f"train.data must be a {data_config.__module__}.{data_config.__name__} (or its fields as a "
                f"mapping) for member {self.member}, got {type(self.data).__name__}"
            )
        object.__setattr__(self, "data", paradigm.bind_data(self.data, self.out_dir))  # run-relative paths
        gate_ok = not self.distill_gate or type(paradigm).teacher_task_loss is not Paradigm.teacher_task_loss
        fsdp_ok = self.parallel != "fsdp2" or (self.width != "msg" and self.optimizer_init != "grown")
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
            (
                "distill",
                self.distill in paradigm.distill_targets,
                f"must be one of {', '.join(paradigm.distill_targets)} for a {paradigm.name} member",
            ),
            ("distill_gate", gate_ok, f"is not available for the {paradigm.name} paradigm; set it to false"),
            ("parallel", self.parallel in PARALLEL, f"must be one of {', '.join(PARALLEL)}"),
            ("compile", not (self.compile and self.parallel == "fsdp2"), "is not supported with fsdp2 yet"),
            ("parallel", fsdp_ok, "fsdp2 does not support width=msg or optimizer_init=grown yet; use ddp"),
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
        if isinstance(self.progressive, dict):
            progressive = from_dict(ProgressiveConfig, self.progressive, where="train.progressive")
            object.__setattr__(self, "progressive", progressive)
        if self.progressive is not None:
            self._check_progressive(member)

    def _check_progressive(self, member: Member) -> None:
        """AutoProg-One on this member: refused by name now, not at step 0 (a chain loads every member)."""
        if member.paradigm.progressive_ops() is None:
            raise ValueError(
                f"train.progressive: the {member.paradigm.name} paradigm of {member.name} has no progressive "
                "training; remove train.progressive"
            )
        if self.parallel == "fsdp2":
            raise ValueError(
                "train.progressive cannot run under parallel=fsdp2: AutoProg replaces the model at every "
                "growth and the FSDP2 wrapping does not follow it yet; use parallel=ddp"
            )
        if self.width == "msg":
            raise ValueError(
                "train.progressive cannot grow a link with width=msg: MSG's growth masks parametrize one "
                "model, and AutoProg replaces the model at every growth; use width=insert"
            )
        try:
            growth_space(member, self.progressive.num_stages)  # a non-ViT member, by name
            if self.steps is not None:  # else the data size decides; build_run checks it before step 0
                Progression(self.progressive, member, self.steps)
        except ValueError as e:
            raise ValueError(f"train.progressive: {e}") from None


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _one_of(value: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(str(value), options, n=1)
    return f"must be one of {', '.join(options)}" + (f"; did you mean {close[0]!r}?" if close else "")


def check_runtime(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` when this machine cannot run ``cfg``: no such device, fp16 without CUDA.

    :func:`compt.chain.load_spec` calls it for every member, so that the spec fails when it is loaded,
    not after a member trained (issue 11); ``train_member`` finds the same errors at setup.
    """
    precision_of(cfg, dist.resolve_device(cfg.device, dist.launch_local_rank()))


def check_schedule(cfg: TrainConfig, total_steps: int, batches_per_epoch: int) -> None:
    """Raise ``ValueError`` when ``cfg``'s AutoProg schedule (``train.progressive``) does not fit a run of
    ``total_steps`` steps whose epoch holds ``batches_per_epoch`` micro-batches (its search's scoring
    batches come from an epoch of another seed). A run's setup and :func:`compt.chain.load_spec` call it,
    the latter for every member before the first trains."""
    prog = cfg.progressive
    if prog is None:
        return
    if prog.schedule == "search" and prog.search_eval_batches > batches_per_epoch:
        raise ValueError(
            f"train.progressive.search_eval_batches={prog.search_eval_batches}: one epoch of "
            f"data.kind={cfg.data.kind} holds only {batches_per_epoch} batches of "
            f"{cfg.global_batch_size // cfg.accum_steps}; lower it or use more data"
        )
    try:
        Progression(prog, get_member(cfg.member, cfg.family), total_steps)
    except ValueError as e:  # too few steps for its stages and searches
        raise ValueError(f"train.progressive: {e}") from None


def precision_of(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``cfg.precision`` on ``device``: (autocast dtype or None for fp32, whether to use a grad scaler)."""
    name = cfg.precision
    if name == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError(
            "train.precision=fp16 needs a CUDA device (and its grad scaler); use fp32 or bf16 on CPU"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], name == "fp16"
