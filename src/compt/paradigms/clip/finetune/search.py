"""AutoProg-Zero's zero-shot schedule search: which unfreezing level and resolution each stage trains.

At the start of each stage s (AutoProg-Zero, arXiv 2410.00350; changlin31/AutoProg-Zero
train_apz.py, auto_grow): the candidates are {current, next} unfreezing level x {current, next}
resolution (before stage 0 "current" is level 1 at the smallest resolution); each is scored on the
same few batches, with no optimizer step, by the NTK score, ZiCo and its step cost
(:mod:`.proxies`); ranks are competition ranks (1, 1, 3; ties within 1e-6 as the official
``get_rankings``), and the chosen candidate has the lowest
``rank(step cost) + 0.5 rank(NTK) + 0.5 rank(ZiCo)``, the earliest candidate (least growth) on a
tie. The official code searches every stage but the last, which takes the fixed schedule's full
setting (all blocks, full resolution), so the run ends trained as it is evaluated; so does this.

Differences from the official code, on purpose: exactly the batches the proxies need are drawn (its
loop over the search loader never breaks); the step cost is exact training MACs by default
(deterministic, so the same run searches the same way on any machine), or wall time measured with
device synchronization; the search's own MACs are returned so the run's training MACs include them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from compt.paradigms.clip.finetune.head import ImageClassifier, classification_loss
from compt.paradigms.clip.finetune.proxies import measured_step_s, ntk_score, train_macs, zico_score
from compt.paradigms.clip.finetune.unfreeze import StagePlan, manual_schedule, set_level, stage_resolutions
from compt.paradigms.clip.progressive import resize_images

__all__ = [
    "AutoProgZeroConfig",
    "CandidateScore",
    "StageChoice",
    "candidates",
    "competition_ranks",
    "choose",
    "stage_step_macs",
    "search_stage",
    "plan_stage",
]

SCHEDULES = ("search", "manual")
STEP_COSTS = ("macs", "measured")
_TIE = 1e-6  # train_apz.py get_rankings: values closer than this share a rank


@dataclass(frozen=True)
class AutoProgZeroConfig:
    """AutoProg-Zero's progressive fine-tuning (defaults: the official DiT settings)."""

    num_stages: int = 4  # K equal stages; also the number of block groups
    min_scale: float = 0.25  # first stage's resolution as a fraction of the full image size
    schedule: str = (
        "search"  # search: zero-shot search per stage | manual: stage s = level s+1, s-th resolution
    )
    search_batch_size: int = 16  # samples per search batch (official: 16)
    ntk_batches: int = 2  # batches scored by the NTK condition (official: batches 0-1)
    zico_batches: int = 2  # batches whose gradient spread ZiCo measures (official: batches 2-3), >= 2
    step_cost: str = "macs"  # macs: exact training MACs per step | measured: synchronized wall time
    time_batches: int = 6  # batches timed per candidate when step_cost=measured (official: batches 4-9)
    sid: bool = False  # add a learned stage id (SID) to the class token
    sid_null_prob: float = 0.1  # probability of the null stage id per training sample (official: 0.1)

    def __post_init__(self) -> None:
        checks = [
            ("num_stages", self.num_stages >= 1, "must be >= 1"),
            ("min_scale", 0 < self.min_scale <= 1, "must be in (0, 1]"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("search_batch_size", self.search_batch_size >= 2, "must be >= 2 (the NTK is samples x samples)"),
            ("ntk_batches", self.ntk_batches >= 1, "must be >= 1"),
            ("zico_batches", self.zico_batches >= 2, "must be >= 2 (ZiCo needs a gradient spread)"),
            ("step_cost", self.step_cost in STEP_COSTS, f"must be one of {', '.join(STEP_COSTS)}"),
            ("time_batches", self.time_batches >= 1, "must be >= 1"),
            ("sid_null_prob", 0 <= self.sid_null_prob < 1, "must be in [0, 1)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"autoprog_zero.{name} {why} (got {getattr(self, name)!r})")

    @property
    def search_batches(self) -> int:
        """Batches one stage's search reads (the same batches score every candidate)."""
        return (
            self.ntk_batches + self.zico_batches + (self.time_batches if self.step_cost == "measured" else 0)
        )


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's proxies; ``step_cost`` is MACs per training step, or seconds when measured."""

    plan: StagePlan
    ntk: float
    zico: float
    step_cost: float
    rank_total: float


@dataclass(frozen=True)
class StageChoice:
    """What stage ``stage`` trains, how it was chosen (``scores`` empty when not searched), and its MACs."""

    stage: int
    plan: StagePlan
    how: str  # search | manual | final (the last stage always trains everything at full resolution)
    scores: tuple[CandidateScore, ...] = ()
    search_macs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(current: StagePlan | None, resolutions: Sequence[int], num_stages: int) -> list[StagePlan]:
    """{current, next} level x {current, next} resolution, resolution outer as the official cfg order."""
    if current is not None and current.resolution not in resolutions:
        raise ValueError(
            f"current resolution {current.resolution} is not one of the stages' {list(resolutions)}"
        )
    level, r = (1, 0) if current is None else (current.level, list(resolutions).index(current.resolution))
    levels = sorted({level, min(level + 1, num_stages)})
    res = sorted({r, min(r + 1, len(resolutions) - 1)})
    return [StagePlan(lv, resolutions[ri]) for ri in res for lv in levels]


def competition_ranks(values: Sequence[float], higher_is_better: bool) -> list[int]:
    """1-based competition ranks (1, 1, 3): equal values (within 1e-6) share the better rank."""
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=higher_is_better)
    ranks = [0] * len(values)
    for pos, i in enumerate(order):
        prev = order[pos - 1] if pos else None
        same = prev is not None and (values[i] == values[prev] or abs(values[i] - values[prev]) <= _TIE)
        ranks[i] = ranks[prev] if same else pos + 1
    return ranks


def choose(
    ntk: Sequence[float], zico: Sequence[float], step_cost: Sequence[float]
) -> tuple[int, list[float]]:
    """Index of the lowest ``rank(cost) + 0.5 rank(NTK) + 0.5 rank(ZiCo)`` (first on ties), and all totals."""
    totals = [
        c + 0.5 * n + 0.5 * z
        for c, n, z in zip(
            competition_ranks(step_cost, higher_is_better=False),
            competition_ranks(ntk, higher_is_better=True),
            competition_ranks(zico, higher_is_better=True),
            strict=True,
        )
    ]
    return totals.index(min(totals)), totals


def _loss_fn(stage: int):
    def loss(model: ImageClassifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ids = None if model.stage_embedding is None else torch.full((len(x),), stage, device=x.device)
        return classification_loss(model, x, y, ids)[0]

    return loss


def _resolutions(classifier: ImageClassifier, cfg: AutoProgZeroConfig) -> list[int]:
    if not classifier.is_vit:
        raise ValueError(
            f"AutoProg-Zero needs an open_clip ViT image tower (blocks, patch grid), not "
            f"{type(classifier.visual).__name__}; fine-tune this member without --progressive"
        )
    return stage_resolutions(classifier.image_size, classifier.patch_size, cfg.num_stages, cfg.min_scale)


def stage_step_macs(
    classifier: ImageClassifier,
    plan: StagePlan,
    image: torch.Tensor,
    label: torch.Tensor,
    batch_size: int,
    num_stages: int,
) -> tuple[int, int]:
    """``(MACs of one training step of batch_size samples, MACs of one sample)`` under ``plan``.

    A step is ``batch_size`` forward + backward passes at ``plan.resolution`` plus the AdamW update
    (3 x trainable params, compt.cost's convention). The model's freezing is restored afterwards.
    """
    saved = {p: p.requires_grad for p in classifier.parameters()}
    try:
        set_level(classifier, plan.level, num_stages)
        device = next(classifier.parameters()).device
        x = resize_images(image[:1].to(device), plan.resolution)
        sample = train_macs(classifier, x, label[:1].to(device), _loss_fn(0))
        trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return batch_size * sample + 3 * trainable, sample


def search_stage(
    classifier: ImageClassifier,
    stage: int,
    current: StagePlan | None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: AutoProgZeroConfig,
    train_batch_size: int,
) -> StageChoice:
    """Score stage ``stage``'s candidates on ``batches`` (full-resolution images, labels); no weight changes.

    ``batches`` must hold ``cfg.search_batches`` batches: NTK, then ZiCo, then timing ones. Each
    candidate's images are resized to its resolution; its freezing is applied for scoring and the
    model's own freezing restored afterwards (gradients are never written to ``.grad``).
    """
    if len(batches) < cfg.search_batches:
        raise ValueError(f"search_stage needs {cfg.search_batches} batches, got {len(batches)}")
    k = cfg.num_stages
    resolutions = _resolutions(classifier, cfg)
    cands = candidates(current, resolutions, k)
    device = next(classifier.parameters()).device
    loss_fn, n_ntk, n_zico = _loss_fn(stage), cfg.ntk_batches, cfg.zico_batches
    saved = {p: p.requires_grad for p in classifier.parameters()}
    sid = classifier.stage_embedding is not None

    def ids(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"stage_ids": torch.full((len(x),), stage, device=x.device)} if sid else {}

    ntk, zico, cost, search_macs = [], [], [], 0
    try:
        for plan in cands:
            set_level(classifier, plan.level, k)
            xs = [(resize_images(x.to(device), plan.resolution), y.to(device)) for x, y in batches]
            ntk.append(statistics.fmean(ntk_score(classifier, x, **ids(x)) for x, _ in xs[:n_ntk]))
            zico.append(zico_score(classifier, xs[n_ntk : n_ntk + n_zico], loss_fn))
            step, sample = stage_step_macs(classifier, plan, *batches[0], train_batch_size, k)
            timed = xs[n_ntk + n_zico : cfg.search_batches]
            cost.append(step if cfg.step_cost == "macs" else measured_step_s(classifier, timed, loss_fn))
            # Each scored batch is at most one forward + backward per sample (only weights take gradients).
            search_macs += sample * (1 + sum(len(x) for x, _ in xs[: cfg.search_batches]))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    best, totals = choose(ntk, zico, cost)
    scores = tuple(
        CandidateScore(plan, n, z, c, t)
        for plan, n, z, c, t in zip(cands, ntk, zico, cost, totals, strict=True)
    )
    return StageChoice(stage, cands[best], "search", scores, search_macs)


def plan_stage(
    classifier: ImageClassifier,
    stage: int,
    current: StagePlan | None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: AutoProgZeroConfig,
    train_batch_size: int,
) -> StageChoice:
    """Stage ``stage``'s plan: the fixed schedule (``manual``), the search, or the full last stage."""
    if not 0 <= stage < cfg.num_stages:
        raise ValueError(f"stage {stage} is outside 0..{cfg.num_stages - 1}")
    _resolutions(classifier, cfg)  # a tower AutoProg-Zero cannot drive fails here, whatever the schedule
    fixed = manual_schedule(classifier.image_size, classifier.patch_size, cfg.num_stages, cfg.min_scale)
    if stage == cfg.num_stages - 1:
        return StageChoice(stage, fixed[-1], "final")
    if cfg.schedule == "manual":
        return StageChoice(stage, fixed[stage], "manual")
    return search_stage(classifier, stage, current, batches, cfg, train_batch_size)
