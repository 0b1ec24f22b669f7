"""AutoProg-Zero inside a fine-tuning run: which stage a step is in, entering it, and resuming in it.

A run of T steps has K equal stages (stage s starts at ``floor(s T / K)``, :func:`.unfreeze.stage_of_step`).
At the first step of a stage the driver plans it (:func:`.search.plan_stage`: the zero-shot search,
the manual schedule, or the last stage's full setting), enters it (:func:`.unfreeze.enter_stage`: the
level's blocks train, newly unfrozen ones with fresh AdamW moments), sets the resolution and SID
stage id of the training forward, and prices one step of the stage exactly
(:func:`.search.stage_step_macs`). The search's own MACs go into the run's training MACs (App. C.2
counts everything that trains), its wall time into the run's wall time.

The search reads ``search_batches`` batches of ``search_batch_size`` training images drawn by a
generator seeded with (seed, stage), so it neither consumes nor depends on the training order, and
scoring changes no weight and no RNG state: a resumed run that has to plan a stage again plans it
the same way. A checkpoint stores the choices made so far (:meth:`StageDriver.state_dict`); loading
them re-applies the current stage's freezing, resolution and step price without searching again.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compt.paradigms.clip.data.evalsets import ZeroShotTask
from compt.paradigms.clip.finetune.head import ImageClassifier
from compt.paradigms.clip.finetune.search import AutoProgZeroConfig, StageChoice, plan_stage, stage_step_macs
from compt.paradigms.clip.finetune.unfreeze import StagePlan, enter_stage, set_level, stage_of_step

__all__ = ["StageDriver", "search_batches"]

_SEARCH_STREAM = 0x5EA7C4  # keeps the search's draw apart from the training order's seeds


def search_batches(
    train: ZeroShotTask, cfg: AutoProgZeroConfig, seed: int, stage: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The full-resolution ``(images, labels)`` batches stage ``stage``'s search scores its candidates on."""
    need = cfg.search_batches * cfg.search_batch_size
    if need > len(train.labels):
        raise ValueError(
            f"autoprog_zero: the search needs {need} training images ({cfg.search_batches} batches of "
            f"{cfg.search_batch_size}) but the training set has {len(train.labels)}; lower "
            "autoprog_zero.search_batch_size or use more images"
        )
    order = np.random.default_rng([seed, stage, _SEARCH_STREAM]).permutation(len(train.labels))[:need]
    idx = torch.as_tensor(order).reshape(cfg.search_batches, cfg.search_batch_size)
    return [(train.images[i], train.labels[i]) for i in idx]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no inf (a singular NTK scores -inf)


def choice_record(choice: StageChoice) -> dict[str, Any]:
    """A stage choice as plain JSON: its plan, how chosen, each candidate's proxies, the search's MACs."""
    return {
        "stage": choice.stage,
        "level": choice.plan.level,
        "resolution": choice.plan.resolution,
        "how": choice.how,
        "search_macs": choice.search_macs,
        "scores": [
            {
                "level": c.plan.level,
                "resolution": c.plan.resolution,
                "ntk": _finite(c.ntk),
                "zico": _finite(c.zico),
                "step_cost": c.step_cost,
                "rank_total": c.rank_total,
            }
            for c in choice.scores
        ],  # fmt: skip
    }


class StageDriver:
    """Plans and enters AutoProg-Zero's stages as the run reaches them (see the module docstring)."""

    def __init__(
        self,
        classifier: ImageClassifier,
        forward: Any,
        cfg: AutoProgZeroConfig,
        train: ZeroShotTask,
        *,
        seed: int,
        total_steps: int,
    ):
        self.classifier, self.forward, self.cfg, self.train = classifier, forward, cfg, train
        self.seed, self.total_steps = seed, total_steps
        self.choices: list[dict[str, Any]] = []  # choice_record of each stage entered so far
        # Fails now, before anything trains, for a tower AutoProg-Zero cannot drive (e.g. Swin).
        plan_stage(classifier, cfg.num_stages - 1, None, [], cfg, 1)

    def stage_at(self, step: int) -> int:
        return stage_of_step(step, self.total_steps, self.cfg.num_stages)

    def enter_due(self, run: Any) -> dict[str, Any] | None:
        """At the first step of a stage not yet entered: plan and enter it; return its record (else None)."""
        stage = self.stage_at(run.state.step)
        if stage < len(self.choices):
            return None
        current = self._plan(-1) if self.choices else None
        batches = [] if self._fixed(stage) else search_batches(self.train, self.cfg, self.seed, stage)
        choice = plan_stage(self.classifier, stage, current, batches, self.cfg, run.cfg.global_batch_size)
        enter_stage(self.classifier, run.optimizer, choice.plan, self.cfg.num_stages)
        run.state.train_macs += choice.search_macs
        self.choices.append(choice_record(choice))
        self._apply(run, stage)
        return {
            "kind": "stage",
            "step": run.state.step,
            **self.choices[-1],
            "macs_per_step": run.macs_per_step,
        }

    def _fixed(self, stage: int) -> bool:
        return self.cfg.schedule == "manual" or stage == self.cfg.num_stages - 1

    def _plan(self, i: int) -> StagePlan:
        return StagePlan(self.choices[i]["level"], self.choices[i]["resolution"])

    def _apply(self, run: Any, stage: int) -> None:
        """The training forward's resolution and stage id, and the price of one step, for ``stage``."""
        plan = self._plan(stage)
        self.forward.resolution, self.forward.stage = plan.resolution, stage
        image, label = self.train.images[:1], self.train.labels[:1]
        batch = run.cfg.global_batch_size
        run.macs_per_step = stage_step_macs(self.classifier, plan, image, label, batch, self.cfg.num_stages)[
            0
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"choices": [dict(c) for c in self.choices]}

    def load_state_dict(self, state: dict[str, Any], run: Any) -> None:
        """Restore the choices made so far and re-apply the current stage (freezing, resolution, price)."""
        self.choices = [dict(c) for c in state["choices"]]
        if self.choices:
            stage = len(self.choices) - 1
            set_level(self.classifier, self._plan(stage).level, self.cfg.num_stages)
            self._apply(run, stage)
