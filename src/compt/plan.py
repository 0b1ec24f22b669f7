"""Planning a chain before training (paper §3.1.2, Table 2): epoch allocation and the cost columns.

:func:`allocate_epochs` follows §3.1.2's rule (epochs decrease linearly in log(params) along the
chain, scaled to a target acceleration); :func:`plan_chain` gives, per member, the training MACs of
its individual (baseline) run and of its chain link, and the acceleration ratios of Table 2. Costs
come from :func:`compt.cost.member_cost`, built on the meta device, so planning ViT-L takes seconds.
A chain member may train with AutoProg-One (issue 15; :mod:`compt.engine.progressive`): its cost is
then its stages' (:func:`compt.engine.progressive_cost.progressive_macs`), an estimate for a searched
schedule, whose searches have not run yet (:func:`~compt.engine.progressive_cost.assume_linear_ramp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from compt.cost import PAPER_BATCH_SIZE, member_cost, run_macs, run_steps
from compt.engine.progressive import Progression, ProgressiveConfig
from compt.engine.progressive_cost import assume_linear_ramp, progressive_macs
from compt.families import Member, check_ascending, get_member

__all__ = [
    "PlanRow",
    "ChainPlan",
    "allocate_epochs",
    "plan_chain",
    "DEFAULT_TARGET_RATIO",
    "DEFAULT_END_FRACTION",
]

# Table 2: ViT-T -> S -> B -> L on CC3M reaches 5.68x accumulated acceleration.
DEFAULT_TARGET_RATIO = 5.68
# App. B.1: interpolated minimum epochs 23.45 -> 12.34 along ViT-S -> L (0.53), Table D Swin 24 -> 12.
DEFAULT_END_FRACTION = 0.5


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _check_positive_number(value: Any, what: str) -> float:
    # Fractional epochs are a normal chain setting (the demo's links train 1 and 0.75 epochs).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return value


def allocate_epochs(
    members: Sequence[Member | str],
    baseline_epochs: float,
    target_ratio: float | None = DEFAULT_TARGET_RATIO,
    *,
    sample: Mapping[str, Any] | None = None,
    end_fraction: float = DEFAULT_END_FRACTION,
) -> list[float]:
    """Initial epochs per chain member following §3.1.2's "Training Epoch Allocation" rule.

    The first member trains for ``baseline_epochs`` (it has no teacher). The others decrease
    linearly in log(params) ("linearly as model size increases exponentially"): member i gets
    ``e * (1 - (1 - end_fraction) * log(p_i / p_2) / log(p_n / p_2))``, so the second member gets
    ``e`` and the last ``end_fraction * e``. ``e`` is solved so the chain's accumulated training MACs
    are ``1 / target_ratio`` of training every member for ``baseline_epochs`` (per-sample MACs only;
    the AdamW update is under 0.1% and ignored here). Link epochs are rounded to integers in
    ``[1, baseline_epochs]`` (``baseline_epochs`` itself when that is below 1), so the achieved
    ratio is close to, not exactly, the target; an unreachable target gives 1 epoch per link. The
    paper then validates the first link and relaxes the ratio if it is not lossless; that is the
    chain runner's job. ``target_ratio=None`` means
    ``DEFAULT_TARGET_RATIO``. ``sample`` describes one training sample in the paradigm's terms
    (:func:`compt.cost.member_cost`; CLIP: ``{"num_captions": 4}``, the default).
    """
    if isinstance(members, int):
        raise TypeError(
            "allocate_epochs needs the chain's members (Member objects or names), not their count"
        )
    _check_positive_number(baseline_epochs, "baseline_epochs")
    target_ratio = DEFAULT_TARGET_RATIO if target_ratio is None else target_ratio
    if not target_ratio >= 1.0:
        raise ValueError(f"target_ratio must be >= 1 (chain cost / baseline cost <= 1), got {target_ratio!r}")
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction!r}")
    costs = [member_cost(m, **(sample or {})) for m in members]
    if not costs:
        raise ValueError("allocate_epochs needs at least one member")
    if len(costs) == 1:
        return [baseline_epochs]
    sizes = [c.params["total"] for c in costs]
    span = math.log(sizes[-1] / sizes[1]) if len(costs) > 2 else 0.0
    position = [math.log(s / sizes[1]) / span if span > 0 else 0.0 for s in sizes[1:]]  # 0 .. 1
    weights = [1.0 - (1.0 - end_fraction) * x for x in position]
    links = [c.train_macs + t.forward_macs for t, c in zip(costs, costs[1:], strict=False)]
    baseline = baseline_epochs * sum(c.train_macs for c in costs)
    budget = baseline / target_ratio - baseline_epochs * costs[0].train_macs
    scale = max(budget, 0.0) / sum(w * link for w, link in zip(weights, links, strict=False))
    return [baseline_epochs] + [min(baseline_epochs, max(1, round(scale * w))) for w in weights]


# --- chain plan (Table 2 cost columns) -----------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    """One member of a planned chain: its per-sample cost and its baseline vs chain run MACs."""

    name: str
    params: dict[str, int]
    forward_macs: int  # per sample
    train_macs: int  # per sample, forward + backward
    epochs: float  # chain epochs (fractions allowed)
    teacher: str | None
    baseline_macs: int  # individual, baseline_epochs from scratch
    chain_macs: int  # individual, as a chain link (teacher forward included)
    baseline_accumulated_macs: int
    chain_accumulated_macs: int
    individual_acceleration: float
    accumulated_acceleration: float
    progressive: str | None = None  # its chain run's AutoProg schedule ("search", "manual"), else None


@dataclass(frozen=True)
class ChainPlan:
    """Training MACs of a model family, individually (baseline) vs as a chain (paper Table 2)."""

    rows: tuple[PlanRow, ...]
    samples: int
    baseline_epochs: float
    sample: dict[str, Any]  # one training sample, as the paradigm describes it
    batch_size: int
    allocated: bool  # epochs came from allocate_epochs, not from the caller
    target_ratio: float | None
    end_fraction: float | None

    @property
    def baseline_total_macs(self) -> int:
        return self.rows[-1].baseline_accumulated_macs

    @property
    def chain_total_macs(self) -> int:
        return self.rows[-1].chain_accumulated_macs

    @property
    def acceleration(self) -> float:
        return self.baseline_total_macs / self.chain_total_macs

    @property
    def estimate(self) -> bool:
        """Whether a chain cost assumes a search's outcome (an AutoProg member with a searched schedule)."""
        return any(r.progressive == "search" for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the plan settings, one dict per member, and the totals."""
        out = {k: v for k, v in asdict(self).items() if k != "rows"}
        out["members"] = [asdict(r) for r in self.rows]
        out["baseline_total_macs"] = self.baseline_total_macs
        out["chain_total_macs"] = self.chain_total_macs
        out["acceleration"] = self.acceleration
        out["estimate"] = self.estimate
        return out


def plan_chain(
    members: Sequence[Member | str],
    samples: int,
    baseline_epochs: float,
    epochs: Sequence[float] | None = None,
    *,
    sample: Mapping[str, Any] | None = None,
    batch_size: int = PAPER_BATCH_SIZE,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    end_fraction: float = DEFAULT_END_FRACTION,
    progressive: Sequence[ProgressiveConfig | None] | None = None,
) -> ChainPlan:
    """Cost of training ``members`` (smallest first) individually vs as a chain (Table 2 columns).

    ``samples`` are training samples (images) per epoch; ``sample`` describes one in the paradigm's
    terms (CLIP: ``{"num_captions": 4}``, the default). Epochs may be fractions: each run has
    :func:`compt.cost.run_steps` optimizer steps, as the engine trains them. Without ``epochs``,
    they come from :func:`allocate_epochs`.
    Member i > 0 is a chain link whose teacher is member i - 1. ``progressive`` (one entry per member,
    ``None`` for a plain run) trains a chain member with AutoProg-One; the baseline columns stay
    individual training without it.
    """
    members = [get_member(m) for m in members]
    if not members:
        raise ValueError("a chain needs at least one member")
    _check_positive_int(samples, "samples")
    _check_positive_number(baseline_epochs, "baseline_epochs")
    _check_positive_int(batch_size, "batch_size")
    if samples < batch_size:
        raise ValueError(
            f"samples ({samples}) is smaller than batch_size ({batch_size}): no optimizer step would run; "
            "lower the batch size"
        )
    check_ascending(members)
    allocated = epochs is None
    if epochs is None:
        epochs = allocate_epochs(
            members, baseline_epochs, target_ratio, sample=sample, end_fraction=end_fraction
        )
    epochs = list(epochs)
    if len(epochs) != len(members):
        names = ", ".join(m.name for m in members)
        raise ValueError(
            f"got {len(epochs)} epoch values for {len(members)} members ({names}); give one per member"
        )
    for m, e in zip(members, epochs, strict=False):
        _check_positive_number(e, f"epochs of {m.name}")
    progressive = list(progressive) if progressive is not None else [None] * len(members)
    if len(progressive) != len(members):
        raise ValueError(f"got {len(progressive)} progressive entries for {len(members)} members")
    costs = [member_cost(m, **(sample or {})) for m in members]
    rows, base_acc, chain_acc = [], 0, 0
    for i, (c, e) in enumerate(zip(costs, epochs, strict=False)):
        teacher = costs[i - 1] if i > 0 else None
        base = run_macs(c, samples=samples, epochs=baseline_epochs, batch_size=batch_size)
        chain = run_macs(c, samples=samples, epochs=e, batch_size=batch_size, teacher=teacher)
        if progressive[i] is not None:
            steps = run_steps(e, samples // batch_size)
            chain = _progressive_macs(members, i, progressive[i], steps, batch_size, sample)
        base_acc, chain_acc = base_acc + base, chain_acc + chain
        rows.append(
            PlanRow(
                name=c.name,
                params=c.params,
                forward_macs=c.forward_macs,
                train_macs=c.train_macs,
                epochs=e,
                teacher=teacher.name if teacher else None,
                baseline_macs=base,
                chain_macs=chain,
                baseline_accumulated_macs=base_acc,
                chain_accumulated_macs=chain_acc,
                individual_acceleration=base / chain,
                accumulated_acceleration=base_acc / chain_acc,
                progressive=progressive[i].schedule if progressive[i] is not None else None,
            )
        )
    return ChainPlan(
        rows=tuple(rows),
        samples=samples,
        baseline_epochs=baseline_epochs,
        sample=costs[0].sample,
        batch_size=batch_size,
        allocated=allocated,
        target_ratio=target_ratio if allocated else None,
        end_fraction=end_fraction if allocated else None,
    )


def _progressive_macs(
    members: Sequence[Member],
    index: int,
    cfg: ProgressiveConfig,
    steps: int,
    batch_size: int,
    sample: Mapping[str, Any] | None,
) -> int:
    """Training MACs of chain member ``index`` trained with AutoProg-One (searches assumed, see module)."""
    member, teacher = members[index], members[index - 1] if index > 0 else None
    try:
        prog = assume_linear_ramp(Progression(cfg, member, steps, teacher=teacher))
    except ValueError as e:
        raise ValueError(f"{member.name}: {e}") from None
    return progressive_macs(prog, batch_size=batch_size, sample=sample, teacher=teacher).total_macs
