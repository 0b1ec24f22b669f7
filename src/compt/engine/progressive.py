"""AutoProg-One inside one member's run (Li et al., CVPR 2022; journal arXiv 2410.00350): the stages, the
growth space, the schedule (searched or manual) and its training-MAC cost.

A run is split into K equal stages (official code: K = 4, prog/progressive.py:19). Each stage trains a
shallower network on lower-resolution input; the last stage is the full member at full resolution. The
growth space per stage index ``i`` is ``linspace(0.5, 1, K)[i]`` of each tower's depth and of the image
size, rounded to whole layers and to the patch grid (prog/progressive.py:20-22). Which point of the space
a stage trains comes from a fixed manual schedule or from a one-shot search at each growth
(:mod:`compt.engine.progressive_search`); its cost is :mod:`compt.engine.progressive_cost`, what the
training loop does at its points :mod:`compt.engine.progressive_train`, and the model operations (growth
from the EMA, sub-nets, running a ViT at another resolution) :mod:`compt.paradigms.clip.progressive`.

:class:`Progression` answers, for any step, what that step trains, and says where the loop must grow
the model or score a search; it is a pure function of the config, the step and the choices made so far,
which is all a checkpoint has to hold for an exact resume::

    prog = Progression(ProgressiveConfig(), get_member("ViT-B/16"), total_steps=100_000)
    prog.plan(0)       # StepPlan(stage=0, phase='search', shape=<the candidate step 0 trains>, ...)
    prog.boundary(s)   # "build" | "grow" | "choose" | None: what to do before step s
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from compt.cost import member_cost
from compt.engine.progressive_search import SearchResult, choose_candidate, sample_candidate, supernet_keep
from compt.families import Member

__all__ = [
    "SCHEDULES",
    "SEARCH_COSTS",
    "OPTIMIZER_GROWTH",
    "ProgressiveConfig",
    "Shape",
    "StepPlan",
    "GrowthSpace",
    "growth_space",
    "make_divisible",
    "stage_bounds",
    "stage_of",
    "stage_member",
    "at_resolution",
    "Progression",
]

SCHEDULES = ("search", "manual")
SEARCH_COSTS = ("macs", "wall")
OPTIMIZER_GROWTH = ("carry", "reset")
# The official EMA decay 0.9996 (main_prog.py:1382) has a half-life of ln 0.5 / ln 0.9996 = 1733 steps;
# its run has 4 stages of 25 ImageNet epochs at batch 1024 (8 x 128, scripts/train_autoprog.sh), i.e.
# 25 * 1,281,167 / 1024 = 31,277 steps a stage: a half-life of 0.0554 of a stage.
OFFICIAL_EMA_HALF_LIFE = 0.0554
# 2 search epochs per growth of a 25-epoch stage (scripts/train_autoprog.sh: --search-epochs 2).
OFFICIAL_SEARCH_FRACTION = 0.08
MAX_CANDIDATES = 9  # stage 0: {min, mid, max} depth x {min, mid, max} resolution


@dataclass(frozen=True)
class ProgressiveConfig:
    """AutoProg-One's settings for one member's run (every field checked on construction)."""

    num_stages: int = 4  # K equal stages of the run (official: 4); the last trains the full member
    schedule: str = "search"  # "search": one-shot search at each growth; "manual": `depth`/`resolution`
    depth: tuple[int, ...] = ()  # manual: per stage, index into the growth space's depths (); () = 0..K-1
    resolution: tuple[int, ...] = ()  # manual: per stage, index into its image sizes; () = 0..K-1
    search_fraction: float = OFFICIAL_SEARCH_FRACTION  # search phase per growth, fraction of a stage
    search_cost: str = "macs"  # T of a candidate: "macs" (exact training MACs, deterministic) | "wall" (s)
    search_eval_batches: int = 5  # L of a candidate: mean no-grad loss over this many batches (official 5)
    ema_half_life: float = OFFICIAL_EMA_HALF_LIFE  # MoGrow EMA half-life, fraction of a stage
    mogrow: bool = True  # grow from the EMA (MoGrow); False: from the online weights (plain growth)
    optimizer_growth: str = "carry"  # "carry": AdamW moments duplicated with their layers | "reset"

    def __post_init__(self) -> None:
        k = self.num_stages
        checks = [
            ("num_stages", isinstance(k, int) and k >= 1, "must be an integer >= 1"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("search_fraction", 0 < self.search_fraction < 1, "must be in (0, 1) (a fraction of a stage)"),
            ("search_cost", self.search_cost in SEARCH_COSTS, f"must be one of {', '.join(SEARCH_COSTS)}"),
            ("search_eval_batches", self.search_eval_batches >= 1, "must be >= 1"),
            ("ema_half_life", self.ema_half_life > 0, "must be > 0 (a fraction of a stage)"),
            (
                "optimizer_growth",
                self.optimizer_growth in OPTIMIZER_GROWTH,
                f"must be one of {', '.join(OPTIMIZER_GROWTH)}",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"progressive.{name} {why} (got {getattr(self, name)!r})")
        for name in ("depth", "resolution"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            self._check_manual(name, getattr(self, name))

    def _check_manual(self, name: str, value: tuple[int, ...]) -> None:
        if not value:
            return
        k = self.num_stages
        if self.schedule != "manual":
            raise ValueError(f"progressive.{name} is a manual schedule; set progressive.schedule=manual")
        if len(value) != k or any(not isinstance(i, int) or not 0 <= i < k for i in value):
            raise ValueError(
                f"progressive.{name} needs one growth-space index in 0..{k - 1} per stage "
                f"({k} values), got {list(value)}"
            )
        if any(b < a for a, b in zip(value, value[1:], strict=False)) or value[-1] != k - 1:
            raise ValueError(
                f"progressive.{name} {list(value)} must never shrink and must end at {k - 1} "
                "(the last stage trains the full member)"
            )

    def manual_indices(self, name: str) -> tuple[int, ...]:
        """The manual schedule's growth-space index per stage (``()`` means the linear ramp 0..K-1)."""
        return getattr(self, name) or tuple(range(self.num_stages))


# --- the growth space --------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Shape:
    """One point of the growth space: blocks per tower and the input image size (pixels per side)."""

    vision_layers: int
    text_layers: int
    image_size: int

    @property
    def depth(self) -> dict[str, int]:
        """Blocks per tower, keyed as compt.grow names them."""
        return {"visual": self.vision_layers, "text": self.text_layers}

    def key(self) -> str:
        return f"v{self.vision_layers}-t{self.text_layers}-r{self.image_size}"


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains."""

    stage: int
    phase: str  # "search" (the elastic supernet, one candidate) or "train"
    shape: Shape  # the blocks this step runs and the input resolution
    model: Shape  # the module's depth (the supernet's during a search); image_size is the member's
    keep: dict[str, tuple[int, ...]] | None = None  # search: the supernet blocks run, per tower


def make_divisible(value: float, divisor: int, round_limit: float = 0.9) -> int:
    """``value`` rounded to a multiple of ``divisor`` (at least one), never more than 10% down (timm's
    rule, which the official code copies in prog/progressive.py:35)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < round_limit * value else out


@dataclass(frozen=True)
class GrowthSpace:
    """Per growth-space index ``i`` (``0..K-1``): depths and image size at ``linspace(0.5, 1, K)[i]``."""

    depths: tuple[tuple[int, int], ...]  # (vision blocks, text blocks)
    image_sizes: tuple[int, ...]

    def shape(self, depth: int, resolution: int) -> Shape:
        return Shape(*self.depths[depth], self.image_sizes[resolution])

    @property
    def full(self) -> Shape:
        return self.shape(-1, -1)


def growth_space(member: Member, num_stages: int, teacher: Member | None = None) -> GrowthSpace:
    """The official growth space for ``member``: depth and resolution in ``linspace(0.5, 1, K)``.

    A chain link's stages never go shallower than its ``teacher``: the stage-0 model is grown from
    the teacher (inverse weight initialization, §3.1.1), and a shallower one would drop teacher layers.
    """
    _check_vit(member)
    fractions = np.linspace(0.5, 1.0, num_stages) if num_stages > 1 else np.ones(1)
    v, t = member.vision_cfg["layers"], member.text_cfg["layers"]
    floor_v = min(v, teacher.vision_cfg["layers"]) if teacher is not None else 1
    floor_t = min(t, teacher.text_cfg["layers"]) if teacher is not None else 1
    patch = member.vision_cfg["patch_size"]
    return GrowthSpace(
        depths=tuple(
            (max(floor_v, make_divisible(f * v, 1)), max(floor_t, make_divisible(f * t, 1)))
            for f in fractions
        ),  # fmt: skip
        image_sizes=tuple(
            min(member.image_size, make_divisible(f * member.image_size, patch)) for f in fractions
        ),
    )


def _check_vit(member: Member) -> None:
    vision = member.vision_cfg
    size = vision.get("image_size", 224)
    if vision.get("timm_model_name") or not isinstance(size, int) or size % vision["patch_size"]:
        raise ValueError(
            f"progressive training grows open_clip ViT towers with a square image a whole number of patches "
            f"wide; member {member.name} has vision_cfg {vision}. Use a ViT member"
        )


def stage_member(member: Member, shape: Shape) -> Member:
    """``member`` with ``shape``'s blocks per tower; widths and the image size (so the full-size
    positional embedding) stay the member's, as a stage runs lower resolutions by interpolation."""
    cfg = member.open_clip_config()
    cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"] = shape.vision_layers, shape.text_layers
    name = f"{member.name}[v{shape.vision_layers},t{shape.text_layers}]"
    return type(member)(name=name, family=member.family, model_cfg=cfg)


def at_resolution(member: Member, shape: Shape) -> Member:
    """The stage model as a member built for ``shape.image_size`` (what its forward costs, App. C.2)."""
    m = stage_member(member, shape)
    cfg = m.open_clip_config()
    cfg["vision_cfg"]["image_size"] = shape.image_size
    return type(m)(name=f"{m.name}@{shape.image_size}", family=m.family, model_cfg=cfg)


# --- stages ------------------------------------------------------------------------------------------


def stage_bounds(total_steps: int, num_stages: int) -> tuple[int, ...]:
    """The first step of each stage and the end of the run: ``K + 1`` values (official:
    ``linspace(0, epochs, K + 1)`` floored, prog/progressive.py:19)."""
    if total_steps < num_stages:
        raise ValueError(
            f"a progressive run of {total_steps} steps cannot have {num_stages} stages; "
            "train for more steps or lower progressive.num_stages"
        )
    return tuple(k * total_steps // num_stages for k in range(num_stages + 1))


def stage_of(step: int, bounds: tuple[int, ...]) -> int:
    """The stage that step ``step`` (0-based) belongs to."""
    if not 0 <= step < bounds[-1]:
        raise ValueError(f"step {step} is outside the run's {bounds[-1]} steps")
    return int(np.searchsorted(bounds, step, side="right")) - 1


# --- the schedule at run time -------------------------------------------------------------------------


class Progression:
    """Stage, phase and shape of every step of one progressive run, and the choices of its searches.

    The loop calls :meth:`boundary` before each step: ``"build"`` (step 0: a fresh model of
    ``plan(0).model``), ``"grow"`` (MoGrow into ``plan(step).model``), ``"choose"`` (a search ends: score
    the candidates with :meth:`candidates` and :meth:`choose`, then extract :meth:`extraction`). Only
    :meth:`state_dict` needs saving; the rest follows from the config and the step. A checkpoint taken
    before step ``s`` holds a model of depth :meth:`model_at` ``(s)``; the resumed loop then does step
    ``s``'s boundary work as an uninterrupted one would.
    """

    def __init__(
        self,
        cfg: ProgressiveConfig,
        member: Member,
        total_steps: int,
        *,
        seed: int = 0,
        teacher: Member | None = None,
    ):
        self.cfg, self.member, self.seed = cfg, member, seed
        self.space = growth_space(member, cfg.num_stages, teacher)  # a link: never below its teacher
        self.bounds = stage_bounds(total_steps, cfg.num_stages)
        self.results: dict[int, SearchResult] = {}  # search stage -> its outcome (choice included)
        self._times: dict[int, dict[Shape, list[float]]] = {}  # wall-clock search: step times per candidate
        search = self._search_steps(self.stage_steps, MAX_CANDIDATES)
        if cfg.schedule == "search" and cfg.num_stages > 1 and search >= self.stage_steps:
            raise ValueError(
                f"a search phase takes at least one step per candidate (up to {MAX_CANDIDATES}) and "
                f"needs training after it, but this run's stages have {self.stage_steps} steps and a "
                f"search {search}; train for at least {(MAX_CANDIDATES + 1) * cfg.num_stages} steps, "
                "lower progressive.search_fraction or use progressive.schedule=manual"
            )

    @property
    def stage_steps(self) -> int:
        """Steps of the shortest stage (what the EMA half-life is a fraction of)."""
        return min(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    def _search_steps(self, stage_steps: int, num_candidates: int) -> int:
        return max(num_candidates, round(self.cfg.search_fraction * stage_steps))

    def is_search_stage(self, stage: int) -> bool:
        """Whether ``stage`` opens with a search (searched schedule, not the last stage, > 1 candidate)."""
        last = stage == self.cfg.num_stages - 1
        return self.cfg.schedule == "search" and not last and len(self.candidates(stage)) > 1

    def candidates(self, stage: int) -> tuple[Shape, ...]:
        """The official candidates (main_prog.py:793-802), without repeated shapes. Stage 0: {min, mid,
        max} depth x {min, mid, max} resolution; later: the current or next resolution x up to three
        depths above the current one (the current one once depth is full)."""
        depths, sizes = _unique(self.space.depths), _unique(self.space.image_sizes)
        if stage == 0:
            pick = lambda xs: _unique([xs[0], xs[len(xs) // 2], xs[-1]])  # noqa: E731
            return tuple(Shape(*d, r) for d in pick(depths) for r in pick(sizes))
        now = self.train_shape(stage - 1)
        d = depths.index((now.vision_layers, now.text_layers))
        r = sizes.index(now.image_size)
        grown = depths[d + 1 : d + 4] or depths[d:]
        return tuple(Shape(*g, s) for g in grown for s in sizes[r : r + 2])

    def search_end(self, stage: int) -> int:
        """The first step after ``stage``'s search phase (its first step when it has none)."""
        start = self.bounds[stage]
        if not self.is_search_stage(stage):
            return start
        return start + self._search_steps(self.bounds[stage + 1] - start, len(self.candidates(stage)))

    def train_shape(self, stage: int) -> Shape:
        """What ``stage`` trains after its search (or all along): manual, chosen, or the full member."""
        if stage == self.cfg.num_stages - 1:
            return self.space.full
        if self.cfg.schedule == "manual":
            d, r = self.cfg.manual_indices("depth")[stage], self.cfg.manual_indices("resolution")[stage]
            return self.space.shape(d, r)
        if stage in self.results:
            return self.results[stage].choice
        if not self.is_search_stage(stage):  # a single candidate: nothing to search
            return self.candidates(stage)[0]
        raise RuntimeError(f"stage {stage}'s search has not been scored; call choose({stage}, ...) first")

    def _supernet(self, stage: int) -> tuple[Shape, dict[str, int]]:
        """The supernet's depth (the deepest candidate) and the depth its blocks were duplicated from."""
        cands = self.candidates(stage)
        top = Shape(
            max(c.vision_layers for c in cands), max(c.text_layers for c in cands), self.member.image_size
        )
        if stage == 0:  # a fresh supernet: its "duplicates" are relative to the shallowest candidate
            return top, {t: min(c.depth[t] for c in cands) for t in top.depth}
        return top, self.train_shape(stage - 1).depth

    def plan(self, step: int) -> StepPlan:
        """What step ``step`` trains (the candidate a search step samples is a function of the step)."""
        stage = stage_of(step, self.bounds)
        full = self.member.image_size
        if step < self.search_end(stage):
            index = step - self.bounds[stage]
            shape = sample_candidate(self.candidates(stage), index, f"{self.seed}/{stage}")
            return StepPlan(stage, "search", shape, self._supernet(stage)[0], self.sub_net(stage, shape))
        shape = self.train_shape(stage)
        return StepPlan(stage, "train", shape, Shape(shape.vision_layers, shape.text_layers, full))

    def model_at(self, step: int) -> Shape | None:
        """The module's depth when step ``step`` begins, before its :meth:`boundary` work (``None`` at
        step 0): what a run resumed from a checkpoint taken there rebuilds before loading its weights."""
        return self.plan(step - 1).model if step > 0 else None

    def boundary(self, step: int) -> str | None:
        """What the loop does before step ``step``: "build", "grow", "choose" or nothing."""
        if step == 0:
            return "build"
        stage = stage_of(step, self.bounds)
        if self.is_search_stage(stage) and step == self.search_end(stage):
            return "choose"
        if step == self.bounds[stage] and self.plan(step).model.depth != self.plan(step - 1).model.depth:
            return "grow"
        return None

    def record_time(self, step: int, seconds: float) -> None:
        """Count a search step's wall time for its candidate (``search_cost="wall"``; pass rank 0's
        time, broadcast, so that every rank chooses alike)."""
        plan = self.plan(step)
        if plan.phase == "search":
            self._times.setdefault(plan.stage, {}).setdefault(plan.shape, []).append(float(seconds))

    def costs(self, stage: int) -> dict[Shape, float]:
        """T of each candidate of ``stage``: per-sample training MACs, or the mean measured step time
        (the first step of each candidate, with its warm-up, left out when it has more)."""
        if self.cfg.search_cost == "macs":
            return {
                c: float(member_cost(at_resolution(self.member, c)).train_macs)
                for c in self.candidates(stage)
            }
        times = self._times.get(stage, {})
        missing = [c.key() for c in self.candidates(stage) if not times.get(c)]
        if missing:
            raise RuntimeError(f"stage {stage}: no step time was recorded for candidates {missing}")
        return {c: float(np.mean(times[c][1:] or times[c])) for c in self.candidates(stage)}

    def choose(self, stage: int, losses: Mapping[Shape, float]) -> SearchResult:
        """Score ``stage``'s candidates from their search losses and record the choice. Under DDP pass
        the losses averaged over ranks, so that every rank chooses alike."""
        result = choose_candidate(self.costs(stage), dict(losses))
        self.results[stage] = result
        return result

    def extraction(self, stage: int) -> dict[str, tuple[int, ...]] | None:
        """After ``stage``'s search: the supernet blocks the chosen sub-net keeps (``None``: all)."""
        return self.sub_net(stage, self.train_shape(stage))

    def sub_net(self, stage: int, shape: Shape) -> dict[str, tuple[int, ...]] | None:
        """The blocks of ``stage``'s supernet that candidate ``shape`` runs, per tower (``None``: all)."""
        top, base = self._supernet(stage)
        if shape.depth == top.depth:
            return None
        return {t: tuple(supernet_keep(base[t], top.depth[t], shape.depth[t])) for t in top.depth}

    def segments(self) -> list[tuple[int, StepPlan]]:
        """The whole run as ``(steps, plan)`` runs of steps that train alike (every search scored)."""
        out: list[tuple[int, StepPlan]] = []
        for stage in range(self.cfg.num_stages):
            start, end, search_end = self.bounds[stage], self.bounds[stage + 1], self.search_end(stage)
            plans = [self.plan(s) for s in range(start, search_end)]  # one per search step
            by_shape = {p.shape: p for p in plans}  # a search step's plan is a function of its shape
            out += [(n, by_shape[shape]) for shape, n in Counter(p.shape for p in plans).items()]
            out.append((end - search_end, self.plan(search_end)))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The search outcomes and (wall-clock search) step times: all a resume needs besides the step."""
        return {
            "results": {
                str(k): {
                    "choice": asdict(r.choice),
                    "exponent": r.exponent,
                    "weight": r.weight,
                    "scores": [[asdict(c), s] for c, s in r.scores.items()],
                }
                for k, r in self.results.items()
            },
            "times": {str(k): [[asdict(c), t] for c, t in d.items()] for k, d in self._times.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.results = {
            int(k): SearchResult(Shape(**r["choice"]), r["exponent"], r["weight"],
                                 {Shape(**c): s for c, s in r["scores"]})
            for k, r in state["results"].items()
        }  # fmt: skip
        self._times = {int(k): {Shape(**c): list(t) for c, t in d} for k, d in state["times"].items()}


def _unique(values) -> list:
    return list(dict.fromkeys(values))
