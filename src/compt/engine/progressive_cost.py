"""Training-MAC cost of an AutoProg-One run (App. C.2, per stage): what ``train_macs`` counts step by step.

Every step costs its stage's forward and backward at its depth and input resolution (a chain link's
teacher forward at that resolution too), its AdamW update and the MoGrow EMA update; every search adds
the scoring of its candidates. :func:`progressive_macs` sums them for a whole run, which is what the
engine's live counter reaches (:mod:`compt.engine.progressive_train`); :func:`assume_linear_ramp` lets
``compt plan`` estimate a searched run before its searches ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compt.cost import member_cost
from compt.engine.progressive import Progression, Shape, StepPlan, at_resolution, stage_member
from compt.engine.progressive_search import SearchResult
from compt.families import Member

__all__ = ["step_macs", "ProgressiveCost", "progressive_macs", "search_eval_macs", "assume_linear_ramp"]


def step_macs(
    member: Member,
    plan: StepPlan,
    *,
    batch_size: int,
    sample: Mapping[str, Any] | None = None,
    teacher: Member | None = None,
) -> int:
    """Training MACs of one optimizer step of ``plan`` (App. C.2), summed over ranks.

    Forward and backward run the blocks of ``plan.shape`` at its resolution; a chain link's teacher
    forward sees the same downsampled images. AdamW updates the parameters that got gradients (3 MACs
    each; a sub-net's skipped blocks get none) and the MoGrow EMA every parameter of the module
    (1 MAC each: one lerp). ``sample`` is one training sample in the paradigm's terms
    (:func:`compt.cost.member_cost`; CLIP: ``{"num_captions": 4}``, the default).
    """
    sample = dict(sample or {})
    at_res = member_cost(at_resolution(member, plan.shape), **sample)
    trained = member_cost(stage_member(member, plan.shape), **sample).update_macs
    module = member_cost(stage_member(member, plan.model), **sample).update_macs // 3
    per_sample = at_res.train_macs
    if teacher is not None:
        shape = Shape(teacher.vision_cfg["layers"], teacher.text_cfg["layers"], plan.shape.image_size)
        per_sample += member_cost(at_resolution(teacher, shape), **sample).forward_macs
    return batch_size * per_sample + trained + module


@dataclass(frozen=True)
class ProgressiveCost:
    """Training MACs of a progressive run, per stage (search steps included) and for the search's scoring."""

    stage_macs: tuple[int, ...]  # per stage: its training steps, search steps included
    search_eval_macs: tuple[int, ...]  # per stage: the no-grad loss of every candidate (0 without a search)
    shapes: tuple[Shape, ...]  # what each stage trained after its search

    @property
    def total_macs(self) -> int:
        return sum(self.stage_macs) + sum(self.search_eval_macs)


def progressive_macs(
    prog: Progression,
    *,
    batch_size: int,
    sample: Mapping[str, Any] | None = None,
    teacher: Member | None = None,
    eval_batch_size: int | None = None,
) -> ProgressiveCost:
    """The training MACs of ``prog``'s run: the sum over its stages of :func:`step_macs` at each step's
    shape, plus each search's scoring (``search_eval_batches`` forward passes per candidate of
    ``eval_batch_size`` samples, default ``batch_size``; the engine scores on micro-batches). Every
    search must have been scored (a manual schedule needs none)."""
    stage_macs = [0] * prog.cfg.num_stages
    for steps, plan in prog.segments():
        stage_macs[plan.stage] += steps * step_macs(
            prog.member, plan, batch_size=batch_size, sample=sample, teacher=teacher
        )
    evals = [
        search_eval_macs(prog, k, batch_size=eval_batch_size or batch_size, sample=sample)
        for k in range(prog.cfg.num_stages)
    ]
    shapes = tuple(prog.train_shape(k) for k in range(prog.cfg.num_stages))
    return ProgressiveCost(tuple(stage_macs), tuple(evals), shapes)


def search_eval_macs(
    prog: Progression, stage: int, *, batch_size: int, sample: Mapping[str, Any] | None = None
) -> int:
    """MACs of scoring ``stage``'s search: ``search_eval_batches`` no-grad forward passes of every
    candidate at its resolution (0 for a stage without a search)."""
    if not prog.is_search_stage(stage):
        return 0
    fwd = sum(
        member_cost(at_resolution(prog.member, c), **dict(sample or {})).forward_macs
        for c in prog.candidates(stage)
    )
    return prog.cfg.search_eval_batches * batch_size * fwd


def assume_linear_ramp(prog: Progression) -> Progression:
    """``prog`` with every search's outcome assumed, for an estimate before training (``compt plan``).

    Each search is taken to choose the linear ramp's point of its stage (growth-space index ``k`` in
    depth and resolution, the manual schedule's default), which is always among its candidates when
    the earlier searches chose theirs; its search phase and scoring are counted as they will run.
    A candidate set without that point (a link's floored depths) takes its cheapest candidate.
    """
    for stage in range(prog.cfg.num_stages):
        if not prog.is_search_stage(stage) or stage in prog.results:
            continue
        candidates = prog.candidates(stage)
        ramp = prog.space.shape(stage, stage)
        choice = ramp if ramp in candidates else min(candidates, key=lambda c: prog.costs(stage)[c])
        prog.results[stage] = SearchResult(choice=choice, exponent=0.0, weight=0.0, scores={})
    return prog
