"""The fine-tune's config: one frozen dataclass, validated in full before anything loads (issue 16).

``compt finetune`` builds it from its flags, ``--config run.yaml`` and ``--set key=value``
(:func:`compt.config.from_dict`: an unknown key names the nearest one). Defaults follow the official
AutoProg-Zero fine-tune (AdamW betas 0.9/0.999, a constant 1e-4 there; here warmup + cosine) and the
CLIP paper's linear probe (App. A.3); the tiny CPU members want a larger ``lr`` (docs/finetune.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from compt.paradigms.clip.finetune.probe import ProbeConfig
from compt.paradigms.clip.finetune.search import AutoProgZeroConfig

__all__ = [
    "MODES",
    "PROGRESSIVE",
    "FinetuneConfig",
    "FINETUNE_SAME_RUN_FIELDS",
    "FINETUNE_FREE_FIELDS",
    "set_name",
    "member_folder",
]

MODES = ("linear-probe", "full")
PROGRESSIVE = ("autoprog-zero",)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Fields that define the run: resuming a folder with other values would silently train another model.
FINETUNE_SAME_RUN_FIELDS = (
    "checkpoint",
    "train_dir",
    "test_dir",
    "mode",
    "progressive",
    "autoprog_zero",
    "epochs",
    "steps",
    "global_batch_size",
    "accum_steps",
    "seed",
    "val_fraction",
)
# Fields that may change between an interruption and its resume without a warning.
FINETUNE_FREE_FIELDS = (
    "out_dir",
    "device",
    "save_every_steps",
    "keep_last",
    "log_every_steps",
    "eval_every_steps",
)


def set_name(train_dir: str | Path) -> str:
    """The name results file a set under: ``shape`` for ``sets/shape/train``, else the folder's own."""
    path = Path(train_dir).absolute()
    return path.parent.name if path.name == "train" else path.name


def member_folder(checkpoint: str | Path) -> Path:
    """The member's run folder of a checkpoint file, run folder or export folder (``<run>/export``)."""
    path = Path(checkpoint)
    if path.is_file() or path.suffix == ".pt":
        return path.parent
    if (path / "open_clip_config.json").is_file():  # an export: its run folder is one up
        return path.parent
    return path


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines one fine-tuning run of one CLIP member on one labelled set."""

    checkpoint: str  # the CLIP: a compt checkpoint (.pt), its run folder, or an exported member folder
    train_dir: str  # training ImageFolder: one sub-folder per class (docs/data.md), classnames file honoured
    test_dir: str  # test ImageFolder with the same class sub-folders
    mode: str = "full"  # linear-probe (frozen tower, logistic regression) | full (tower + head train)
    out_dir: str | None = None  # None: <member folder>/finetune/<set>/<label>-seed<seed>
    progressive: str | None = None  # None | autoprog-zero (full mode only): staged unfreezing + resolution
    autoprog_zero: AutoProgZeroConfig = field(default_factory=AutoProgZeroConfig)  # with progressive
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # linear-probe mode's (its seed: `seed`)
    epochs: float = 10.0  # passes over the training images (fractions allowed); ignored when `steps` is set
    steps: int | None = None  # optimizer steps of the whole run; overrides `epochs`
    global_batch_size: int = 64  # images per optimizer step
    accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (AutoProg-Zero's fine-tune: 1e-4)
    min_lr_ratio: float = 0.0  # learning rate at the end of the cosine, as a fraction of `lr`
    warmup_steps: int | None = None  # linear warmup, optimizer steps; None: 5% of the run
    weight_decay: float = 0.1  # AdamW decoupled decay, not on norms, biases, embeddings
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (AutoProg-Zero: torch's defaults)
    eps: float = 1e-8  # AdamW eps
    grad_clip: float = 0.0  # max global gradient L2 norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a grad scaler)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise reproducible, slower
    seed: int = 0  # data order, SID init and draws, search batches, validation splits (probe's too)
    val_fraction: float = 0.0  # training images held out (stratified) and scored as val_top1; 0: none
    save_every_steps: int = 100  # write step_<N>.pt every this many optimizer steps (0: only final.pt)
    keep_last: int = 2  # step_*.pt files kept (0: keep all)
    log_every_steps: int = 10  # metrics.jsonl line and progress line every this many steps
    eval_every_steps: int = (
        0  # test (and val) top-1 every this many steps; 0: before the first and after the last
    )
    device: str = "auto"  # auto (the GPU if any, else CPU) | cpu | cuda | cuda:K

    def __post_init__(self) -> None:
        checks = [
            ("mode", self.mode in MODES, f"must be one of {', '.join(MODES)}"),
            ("progressive", self.progressive is None or self.progressive in PROGRESSIVE,
             f"must be empty (none) or one of {', '.join(PROGRESSIVE)}"),
            ("progressive", self.progressive is None or self.mode == "full",
             "needs mode=full (a linear probe trains no tower to unfreeze)"),
            ("epochs", self.steps is not None or self.epochs > 0, "must be > 0 (or set `steps`)"),
            ("steps", self.steps is None or self.steps > 0, "must be > 0, or None to use `epochs`"),
            ("global_batch_size", self.global_batch_size >= 1, "must be >= 1"),
            ("accum_steps", self.accum_steps >= 1 and self.global_batch_size % self.accum_steps == 0,
             f"must be >= 1 and divide global_batch_size={self.global_batch_size}"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a finite number > 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be >= 0 or None"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "must be in [0, 1)"),
            ("eps", self.eps > 0, "must be > 0"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            ("save_every_steps", self.save_every_steps >= 0, "must be >= 0"),
            ("keep_last", self.keep_last >= 0, "must be >= 0"),
            ("log_every_steps", self.log_every_steps >= 1, "must be >= 1"),
            ("eval_every_steps", self.eval_every_steps >= 0, "must be >= 0"),
        ]  # fmt: skip
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"finetune.{name} {why} (got {getattr(self, name)!r})")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.out_dir is None:
            folder = member_folder(self.checkpoint) / "finetune" / set_name(self.train_dir)
            object.__setattr__(self, "out_dir", str(folder / f"{self.label}-seed{self.seed}"))

    @property
    def label(self) -> str:
        """The variant's name in results: ``linear-probe``, ``full``, ``autoprog-zero-manual``, ..."""
        if self.progressive is None:
            return self.mode
        apz = self.autoprog_zero
        return f"{self.progressive}-{apz.schedule}" + ("-sid" if apz.sid else "")

    @property
    def member(self) -> str:
        """How the engine's messages name the run (e.g. its NaN guard's)."""
        return f"the fine-tune of {self.checkpoint}"
