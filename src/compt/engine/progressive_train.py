"""AutoProg-One inside the training loop (Li et al., CVPR 2022; journal arXiv 2410.00350), paradigm-free.

:class:`ProgressiveTraining` holds a run's :class:`~compt.engine.progressive.Progression` (what every
step trains), the current stage model with its MoGrow EMA, and the fixed batches a search scores its
candidates on. The loop (:mod:`compt.engine.train`) calls

- :meth:`~ProgressiveTraining.before_step` before every optimizer step: at a growth, MoGrow into the
  next stage's model (from the EMA, or from the online weights); where a search ends, score every
  candidate and keep the chosen sub-net; either way a new AdamW (moments carried with their layers,
  or reset) and a new DDP wrapper, with ``find_unused_parameters`` only while sub-nets skip blocks;
- :meth:`~ProgressiveTraining.resize` and :meth:`~ProgressiveTraining.sub_net` inside the step: the
  step's input resolution (for the student and a link's teacher alike) and the blocks it runs;
- :meth:`~ProgressiveTraining.after_step`: the EMA update (and a wall-clock search's step time);
- :meth:`~ProgressiveTraining.step_macs`: the step's training MACs, at its depth and resolution.

The learning-rate schedule stays the run's global one (no re-warmup at a growth, as the official code).
What a stage model is and how it grows is the paradigm's (:class:`ProgressiveOps`, from
:meth:`compt.paradigms.Paradigm.progressive_ops`; CLIP's: :mod:`compt.paradigms.clip.progressive`).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compt.engine import dist
from compt.engine.progressive import (
    OFFICIAL_EMA_HALF_LIFE,
    Progression,
    ProgressiveConfig,
    Shape,
    StepPlan,
    stage_of,
)
from compt.engine.progressive_cost import search_eval_macs, step_macs
from compt.families import Member
from compt.grow import GrowReport

__all__ = [
    "StageModel",
    "ProgressiveOps",
    "ema_decay",
    "carry_adamw_state",
    "ProgressiveTraining",
]

_LOG = logging.getLogger("compt.train")
Batch = tuple[torch.Tensor, ...]


@dataclass
class StageModel:
    """One stage's model, its EMA, and where each of its parameters came from."""

    model: nn.Module
    ema: Any  # an EMA of `model` with update(model), set(model), module, state_dict() (timm ModelEmaV3)
    member: Member  # the stage member: the full member's widths, the stage's depth
    source: dict[str, str]  # parameter name -> the previous stage's parameter it was made from
    report: GrowReport | None = None  # compt.grow's account of a growth


class ProgressiveOps(abc.ABC):
    """What AutoProg-One asks of a paradigm's models: stage models, growth, sub-nets, lower resolution."""

    @abc.abstractmethod
    def build_stage(
        self, member: Member, depth: Shape, *, decay: float, seed: int, device: torch.device
    ) -> StageModel:
        """A fresh model of ``member`` with ``depth``'s blocks (widths and image size kept), and its EMA."""

    @abc.abstractmethod
    def grow_stage(
        self, prev: StageModel, member: Member, depth: Shape, *, decay: float, mogrow: bool, seed: int
    ) -> StageModel:
        """The next stage's model grown from ``prev`` (from its EMA with ``mogrow``); the EMA from prev's."""

    @abc.abstractmethod
    def extract_subnet(
        self, prev: StageModel, member: Member, keep: Mapping[str, Iterable[int]], *, decay: float, seed: int
    ) -> StageModel:
        """The sub-net of ``prev``'s supernet that runs blocks ``keep[tower]``, as a model of its own."""

    @abc.abstractmethod
    def resize(self, batch: Batch, image_size: int) -> Batch:
        """``batch`` with its images resized to ``image_size`` on their device (the rest unchanged)."""

    @abc.abstractmethod
    def active_layers(
        self, model: nn.Module, keep: Mapping[str, Iterable[int]] | None
    ) -> AbstractContextManager[None]:
        """Within the block, ``model`` runs only blocks ``keep[tower]`` (``None``: all)."""

    @abc.abstractmethod
    def candidate_loss(
        self,
        model: nn.Module,
        keep: Mapping[str, Iterable[int]] | None,
        image_size: int,
        batches: list[Batch],
        local_batch_size: int,
    ) -> float:
        """A search candidate's L: the mean no-grad task loss of sub-net ``keep`` on ``batches``."""

    def scoring_data(self, data_cfg: Any) -> Any:
        """The data config of the search's scoring batches: the training distribution, not its stream."""
        return data_cfg


def ema_decay(stage_steps: int, half_life: float = OFFICIAL_EMA_HALF_LIFE) -> float:
    """MoGrow's EMA decay for stages of ``stage_steps`` steps: ``0.5 ** (1 / (half_life * stage_steps))``.

    The half-life is a fraction of a stage (at least one step), so a short run averages over the same
    share of each stage as the official 100-epoch run does with 0.9996 (``half_life=0.0554``, see
    OFFICIAL_EMA_HALF_LIFE).
    """
    if stage_steps < 1 or not half_life > 0:
        raise ValueError(f"ema_decay needs stage_steps >= 1 and half_life > 0 ({stage_steps}, {half_life})")
    return 0.5 ** (1.0 / max(1.0, half_life * stage_steps))


def carry_adamw_state(
    old: torch.optim.Optimizer,
    old_params: Mapping[str, torch.Tensor],
    new: torch.optim.Optimizer,
    new_params: Mapping[str, torch.Tensor],
    source: Mapping[str, str],
) -> int:
    """Give each parameter of ``new`` the AdamW state (``step``, moments) of the parameter it was made
    from (``source``: new name -> old name; unmapped names are the same parameter), so a duplicated
    layer starts with its original's moments; returns how many parameters got a state.

    An improvement on the official code, which builds a fresh optimizer at every growth
    (main_prog.py:1428); a parameter without a carried state starts fresh, as all do with
    ``optimizer_growth="reset"``.
    """
    carried = 0
    for name, p in new_params.items():
        src = old_params.get(source.get(name, name))
        state = old.state.get(src) if src is not None else None
        if not state:
            continue
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"cannot carry AdamW state of {source.get(name, name)} {tuple(src.shape)} to "
                             f"{name} {tuple(p.shape)}: stages grow depth only")  # fmt: skip
        new.state[p] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}
        carried += 1
    return carried


class ProgressiveTraining:
    """AutoProg-One in one run (module docstring). ``run`` arguments are compt.engine.setup.Run."""

    def __init__(
        self,
        cfg: ProgressiveConfig,
        member: Member,
        total_steps: int,
        *,
        seed: int,
        device: torch.device,
        batch_size: int,
        micro_batch_size: int,
        sample: Mapping[str, Any],
        teacher: Member | None = None,
    ):
        ops = member.paradigm.progressive_ops()
        if ops is None:  # TrainConfig refuses it first; here for callers that build a run by hand
            raise ValueError(f"the {member.paradigm.name} paradigm has no progressive training")
        self.cfg, self.member, self.ops, self.teacher = cfg, member, ops, teacher
        self.progression = Progression(cfg, member, total_steps, seed=seed, teacher=teacher)
        self.decay = ema_decay(self.progression.stage_steps, cfg.ema_half_life)
        self.seed, self.device, self.sample = seed, device, dict(sample)
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.stage: StageModel | None = None
        self._scoring: list[Batch] | None = None  # the search's fixed batches, built at the first search
        self._wrapped: bool | None = None  # find_unused of run.forward's wrapper; None: wrap it anew
        self._plan: tuple[int, StepPlan] | None = None
        self._macs: dict[tuple, int] = {}
        self._clock = 0.0

    # --- the model a run starts (or resumes) with ---------------------------------------------------

    def start(self) -> nn.Module:
        """Step 0's model: a fresh stage-0 model (or search supernet). A link grows it from its teacher
        afterwards, then calls :meth:`reset_ema`."""
        self.stage = self._build(self.progression.plan(0).model)
        return self.stage.model

    def reset_ema(self) -> None:
        """Start the EMA at the model's current weights (after a link grew them from its teacher)."""
        self.stage.ema.set(self.stage.model)

    def resume(self, state: Mapping[str, Any], step: int) -> nn.Module:
        """The model of a checkpoint taken before step ``step`` (its weights are loaded by the caller)."""
        self.progression.load_state_dict(state["progression"])
        self.stage = self._build(self.progression.model_at(step))
        self.stage.ema.load_state_dict(state["ema"])
        return self.stage.model

    def state_dict(self) -> dict[str, Any]:
        """The search outcomes and the EMA: what a checkpoint adds for an exact resume."""
        return {"progression": self.progression.state_dict(), "ema": self.stage.ema.state_dict()}

    def _build(self, depth: Shape) -> StageModel:
        return self.ops.build_stage(self.member, depth, decay=self.decay, seed=self.seed, device=self.device)

    # --- every step ----------------------------------------------------------------------------------

    def plan(self, step: int) -> StepPlan:
        """What step ``step`` trains (cached: the step asks several times)."""
        if self._plan is None or self._plan[0] != step:
            self._plan = (step, self.progression.plan(step))
        return self._plan[1]

    def before_step(self, run: Any) -> None:
        """The boundary work before ``run``'s next step: grow, or end a search; re-wrap when needed."""
        step = run.state.step
        kind = self.progression.boundary(step)
        if kind == "grow":  # MoGrow: from the EMA (or the online weights), new blocks by duplication
            depth, mogrow = self.plan(step).model, self.cfg.mogrow
            grown = self.ops.grow_stage(self.stage, self.member, depth, decay=self.decay, mogrow=mogrow,
                                        seed=self.seed)  # fmt: skip
            self._replace(run, grown, "grow")
        elif kind == "choose":
            self._choose(run, stage_of(step, self.progression.bounds))
        # A search's sub-nets skip blocks, which then get no gradient: DDP must be told, during the
        # search only (it costs a graph traversal per step); one wrapper for the whole search phase.
        find_unused = self.plan(step).phase == "search"
        if self._wrapped != find_unused:
            run.wrap(find_unused=find_unused)
            self._wrapped = find_unused
        if self._timing(step):
            self._synchronize()
            self._clock = time.perf_counter()

    def resize(self, batch: Batch, step: int) -> Batch:
        """The micro-batch at step ``step``'s input resolution."""
        return self.ops.resize(batch, self.plan(step).shape.image_size)

    def sub_net(self, model: nn.Module, step: int) -> AbstractContextManager[None]:
        """Around the forward: only the blocks step ``step`` trains run (all but in a search)."""
        return self.ops.active_layers(model, self.plan(step).keep)

    def after_step(self, run: Any) -> None:
        """After the optimizer step: the EMA follows the weights; a wall-clock search times the step."""
        self.stage.ema.update(run.model)
        step = run.state.step
        if self._timing(step):
            self._synchronize()
            self.progression.record_time(step, time.perf_counter() - self._clock)

    def step_macs(self, step: int, teacher_ran: bool) -> int:
        """Training MACs of step ``step`` (App. C.2 at its depth and resolution, the EMA update included)."""
        plan = self.plan(step)
        key = (plan.stage, plan.phase, plan.shape, plan.model, teacher_ran)
        if key not in self._macs:
            teacher = self.teacher if teacher_ran else None
            self._macs[key] = step_macs(self.member, plan, batch_size=self.batch_size, sample=self.sample,
                                        teacher=teacher)  # fmt: skip
        return self._macs[key]

    def describe(self) -> dict[str, Any]:
        """The run's growth space and stages, for the log's start record."""
        space = self.progression.space
        return {
            "stage_bounds": list(self.progression.bounds),
            "depths": [list(d) for d in space.depths],
            "image_sizes": list(space.image_sizes),
            "ema_decay": self.decay,
        }

    # --- growth and search -----------------------------------------------------------------------------

    def _timing(self, step: int) -> bool:
        return self.cfg.search_cost == "wall" and self.plan(step).phase == "search"

    def _synchronize(self) -> None:
        if self.device.type == "cuda":  # the step's kernels, not only their launches (wall-clock search)
            torch.cuda.synchronize(self.device)

    def _replace(self, run: Any, new: StageModel, event: str) -> None:
        """``new`` becomes the run's student: a new AdamW (the old moments carried unless reset)."""
        optimizer = run.new_optimizer(new.model)
        carried = 0
        if self.cfg.optimizer_growth == "carry":
            source = {f"model.{k}": f"model.{v}" for k, v in new.source.items()}
            carried = carry_adamw_state(run.optimizer, _named(run.model, run.projection), optimizer,
                                        _named(new.model, run.projection), source)  # fmt: skip
        run.model, run.optimizer, self.stage = new.model, optimizer, new
        self._wrapped = None  # the forward still wraps the old model
        step, adamw = run.state.step, f"carried for {carried} tensors" if carried else "reset"
        _LOG.info("%s: %s at step %d into %s (AdamW state %s)", run.cfg.member, event, step,
                  new.member.name, adamw)  # fmt: skip
        record = {"kind": "progressive", "event": event, "step": step, "stage": self.plan(step).stage}
        run.log.write(record | {"model": new.member.name})

    def _choose(self, run: Any, stage: int) -> None:
        """Score ``stage``'s candidates on the fixed batches (the same on every rank) and keep the choice."""
        if self.cfg.search_cost == "wall":  # rank 0's step times, so that every rank chooses alike
            self.progression.load_state_dict(dist.broadcast_object(self.progression.state_dict()))
        prog, local = self.progression, self.micro_batch_size // run.info.world_size
        batches = [tuple(x.to(self.device) for x in b) for b in self._scoring_batches(run)]
        candidates = prog.candidates(stage)
        with run.autocast():  # the EMA scored, as the official code (main_prog.py:1892)
            ema = self.stage.ema.module
            score = self.ops.candidate_loss
            losses = [score(ema, prog.sub_net(stage, c), c.image_size, batches, local) for c in candidates]
        mean = dist.all_reduce_mean(torch.tensor(losses, dtype=torch.float64, device=self.device)).tolist()
        result = prog.choose(stage, dict(zip(candidates, mean, strict=True)))
        run.state.train_macs += search_eval_macs(prog, stage, batch_size=self.micro_batch_size,
                                                 sample=self.sample)  # fmt: skip
        step = run.state.step
        _LOG.info("%s: stage %d's search chose %s (w = %.3f) at step %d", run.cfg.member, stage,
                  result.choice.key(), result.weight, step)  # fmt: skip
        record = {"kind": "progressive", "event": "choose", "step": step, "stage": stage}
        record |= {"choice": asdict(result.choice), "exponent": result.exponent, "weight": result.weight}
        record["losses"] = {c.key(): loss for c, loss in zip(candidates, mean, strict=True)}
        run.log.write(record | {"scores": {c.key(): score for c, score in result.scores.items()}})
        keep = self.progression.extraction(stage)
        if keep is not None:  # a shallower choice: the sub-net leaves the supernet as a model of its own
            sub = self.ops.extract_subnet(self.stage, self.member, keep, decay=self.decay, seed=self.seed)
            self._replace(run, sub, "extract")

    def _scoring_batches(self, run: Any) -> list[Batch]:
        """The search's fixed batches: the first ``search_eval_batches`` micro-batches of the scoring data
        (a stream training never reads), the same after a resume; kept on the host. The run checked at
        setup that one epoch holds that many."""
        if self._scoring is None:
            data = self.ops.scoring_data(run.cfg.data)
            loader = run.paradigm.build_loader(data, run.member, global_batch_size=self.micro_batch_size,
                                               rank=run.info.rank, world_size=run.info.world_size, epoch=0,
                                               start_step=0, pin_memory=False)  # fmt: skip
            self._scoring = [b for _, b in zip(range(self.cfg.search_eval_batches), loader, strict=False)]
        return self._scoring


def _named(model: nn.Module, projection: nn.Module) -> dict[str, torch.Tensor]:
    """The optimizer's parameters by name (the student's and the projection T's)."""
    return {**{f"model.{k}": p for k, p in model.named_parameters()},
            **{f"projection.{k}": p for k, p in projection.named_parameters()}}  # fmt: skip
