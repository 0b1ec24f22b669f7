"""Inverse feature distillation (§3.1.1 Eq. 1, §3.2 Eq. 4, App. D.2): a small teacher guides a larger student.

A chain link trains the student on ``L = L_task + L_IFD`` (Eq. 4) with, for CLIP::

    L_IFD = alpha * D / 512 * ( MSE(v_t, T(v_s)) + MSE(t_t, T(t_s)) ) / 2    (Eq. 1, averaged over modalities)

- which features are compared is the paradigm's (:meth:`compt.paradigms.Paradigm.teacher_features`
  and the student's ``out["distill"]``); L_IFD averages the MSE of every feature pair. For CLIP,
  ``v``/``t`` are the final image/text embeddings (open_clip ``encode_image``/``encode_text`` with
  ``normalize=False``), of the same images and the same M captions for teacher and student.
- Normalization: both sides are **L2-normalized** before the MSE. The task loss (Eq. 2) only ever
  sees normalized embeddings, so the knowledge worth transferring is their direction; the raw norm
  is a free degree of freedom of each model and matching it would only fight the task loss. It is
  also what the official code does (it compares ``F.normalize(student)`` with the teacher's
  normalized output): per element, MSE = (2 - 2 cos) / D.
- MSE is the mean over batch (and caption) rows and embedding dims, i.e. Eq. 1's squared L2 norm
  divided by N*D. The official code *sums* the two modality terms; Eq. 4 (and compt) average them,
  so compt's L_IFD is half the official one for the same alpha (App. B.1 reports alpha=500 with r=0.1).
- ``T`` (:func:`make_projection`) maps the student's embedding dim to the teacher's when they differ
  (a learnable linear layer, trained with the student; the official code builds it but never applies
  it in the multi-caption path). With equal dims it is the identity, as in the paper's families.
- The teacher is frozen: eval mode, no gradients, never in the optimizer, never wrapped in DDP. It
  runs under the student's autocast on the same batch (:meth:`Distiller.teacher_features`).
- **alpha is width-independent** (issue 13): a fixed alpha means the paper's weight at the official
  code's embedding width D = 512 (:data:`DEFAULT_REF_DIM`), whatever the member's D. The MSE over D
  dims of unit vectors is ||s - t||^2 / D, so the official alpha = 500 at D = 512 weighs a unit of
  squared distance 500/512 ~ 0.98; the same 500 on a 32-d embedding would weigh it 16x more. compt
  multiplies each MSE by D / ``ref_dim`` (:func:`width_scale`), so every member gets alpha / ref_dim
  per unit of squared distance. ``ref_dim=None`` is the literal per-dimension MSE (compt before
  issue 13, and the official code at any D).
- ``alpha="auto"`` (:class:`AutoAlpha`) sets alpha each step so that L_IFD / L_task stays near r
  (default 0.1, the optimum of App. D.2 / Fig. D); a ratio does not depend on D, so ``ref_dim``
  does not apply to it.
- **Schedules** (issue 13, :func:`register_alpha_schedule`): alpha is multiplied by a factor of the
  run's progress: ``constant`` (the paper), ``linear`` decay to 0 at a fraction of the run (Knowledge
  Inheritance, Qin et al. 2022), ``step``: switched off after a fraction (SALT, arXiv 2410.18779).
  The factor is a function of the step, so a resumed run gets the same alpha; a step whose factor
  is 0 (every step at a fixed alpha of 0) needs no teacher forward at all (:meth:`Distiller.factor`).
- What is distilled is a *target* of the paradigm (:attr:`compt.paradigms.Paradigm.distill_targets`):
  ``"feature"`` is Eq. 1 as above; the LM paradigm also offers ``"logit"``, a KL on the shared
  vocabulary (no T). The paradigm gives each pair's unweighted distance
  (:meth:`~compt.paradigms.Paradigm.distance`), logged as ``mse_<key>`` / ``kl_<key>``; alpha, its
  ``auto`` mode, schedules and the gate weigh it the same whatever the target (the width scale
  applies to feature MSEs only: a KL over the vocabulary is not a mean over dimensions).
- The distillation gate (``gate=True``; beyond the paper, docs/reproduce.md finding 2): L_IFD gets
  weight 0 on a step where the student's task loss is already below the teacher's on the same batch
  (:meth:`Distiller.teacher_task_loss`), so a student never gets pulled back toward a weaker teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compt.engine import dist
from compt.engine.checkpoint import model_from_checkpoint
from compt.families import Member, get_member

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_RATIO",
    "DEFAULT_REF_DIM",
    "width_scale",
    "register_alpha_schedule",
    "list_alpha_schedules",
    "alpha_schedule",
    "load_teacher",
    "make_projection",
    "feature_mse",
    "AutoAlpha",
    "Distiller",
]

DEFAULT_ALPHA = 500.0  # App. B.1: alpha = 500 for all experiments
DEFAULT_RATIO = 0.1  # App. D.2: L_IFD ~ 10% of L_task is the optimum
DEFAULT_REF_DIM = 512  # the official code's embed_dim, the same for every member (issue 13)


def width_scale(feature_dim: int, ref_dim: int | None) -> float:
    """The factor on a D-dim feature MSE that makes a fixed alpha mean the paper's weight at ``ref_dim``.

    MSE = ||s - t||^2 / D for unit vectors, so ``alpha * D / ref_dim * MSE = alpha / ref_dim *
    ||s - t||^2``: the same weight per unit of squared distance at every width (issue 13). ``None``:
    1, the literal per-dimension MSE (the official code, and compt before issue 13).
    """
    return 1.0 if ref_dim is None else feature_dim / ref_dim


# --- alpha schedules (issue 13) ------------------------------------------------------------------

AlphaSchedule = Callable[[float, float], float]  # (progress in [0, 1], fraction) -> factor in [0, 1]
_SCHEDULES: dict[str, AlphaSchedule] = {}


def register_alpha_schedule(name: str) -> Callable[[AlphaSchedule], AlphaSchedule]:
    """Decorator: register ``fn(progress, fraction) -> factor`` as alpha schedule ``name``.

    ``progress`` is steps done / steps of the run; ``fraction`` is ``TrainConfig.alpha_schedule_fraction``.
    """

    def deco(fn: AlphaSchedule) -> AlphaSchedule:
        if name in _SCHEDULES:
            raise ValueError(f"alpha schedule {name!r} is already registered")
        _SCHEDULES[name] = fn
        return fn

    return deco


def list_alpha_schedules() -> list[str]:
    return list(_SCHEDULES)


def alpha_schedule(name: str) -> AlphaSchedule:
    """The registered schedule ``name`` (a ``ValueError`` listing the known ones if absent)."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown alpha schedule {name!r}; known: {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name]


@register_alpha_schedule("constant")
def _constant(progress: float, fraction: float) -> float:
    """The paper: the same alpha for the whole link (App. B.1)."""
    return 1.0


@register_alpha_schedule("linear")
def _linear(progress: float, fraction: float) -> float:
    """Knowledge Inheritance (Qin et al. 2022): r = max(0, 1 - t / T_distil), T_distil = fraction * T."""
    return max(0.0, 1.0 - progress / fraction)


@register_alpha_schedule("step")
def _step(progress: float, fraction: float) -> float:
    """SALT (arXiv 2410.18779): distil in an early phase only, then train on the task alone."""
    return 1.0 if progress < fraction else 0.0


_STAT = {"feature": "mse", "logit": "kl"}  # the logged name of a target's distance


def load_teacher(path: str | Path, student: Member) -> tuple[nn.Module, dict[str, Any], Member]:
    """The teacher of a chain link from its checkpoint: ``(model, payload, member)``.

    The member is the registered one when its config matches the checkpoint, else one built from the
    checkpoint's ``model_cfg`` (a custom family). The paradigm checks that teacher and student can read
    the same batch (for CLIP: the same image size and context length).
    """
    model, payload = model_from_checkpoint(path)
    kind = student.paradigm
    if payload.get("paradigm", kind.name) != kind.name:
        raise ValueError(
            f"teacher {path} is a {payload['paradigm']} model but the student {student.name} is a "
            f"{kind.name} model; a chain grows within one paradigm"
        )
    member = kind.member_class(
        name=str(payload["member"]), family="checkpoint", model_cfg=payload["model_cfg"]
    )
    try:
        registered = get_member(member.name)
        if registered.model_cfg == member.model_cfg:
            member = registered
    except KeyError:
        pass
    kind.check_link(member, student, str(path))
    return model, payload, member


def make_projection(student_dim: int, teacher_dim: int) -> nn.Module:
    """The feature transform T of Eq. 1: identity for equal dims, else a learnable ``Linear``.

    The linear map starts as a truncated identity (``W = I[:teacher_dim, :student_dim]``, zero bias):
    with "insert" width growth the student's first ``teacher_dim`` embedding coordinates are the
    ones initialized from the teacher, so T starts by reading exactly those.
    """
    if student_dim == teacher_dim:
        return nn.Identity()
    proj = nn.Linear(student_dim, teacher_dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(teacher_dim, student_dim))
        proj.bias.zero_()
    return proj


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between L2-normalized embeddings (float32), ``[..., D]`` each."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ; "
            "the projection T must map the student's embedding dim to the teacher's"
        )
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s, t)


class AutoAlpha:
    """alpha_t = r * L_task / D, so that L_IFD / L_task = alpha * D / L_task equals r at every step.

    D is the unweighted distance ``(MSE_image + MSE_text) / 2``; D and L_task are averaged over ranks
    so that every rank uses the same alpha (an LM's L_task is each rank's own); both are detached
    (alpha is a weight, not a path for gradients). With ``decay > 0``, exponential moving averages
    of L_task and D replace the step's values (smoother alpha, but the ratio then lags behind a
    fast-shrinking D). alpha stays a tensor (no host sync per
    step) and is capped so that a student almost equal to its teacher (D ~ 0) cannot get an absurd weight.
    """

    MAX_ALPHA = 1e6

    def __init__(self, ratio: float = DEFAULT_RATIO, decay: float = 0.0):
        if ratio <= 0:
            raise ValueError(f"alpha ratio r must be > 0, got {ratio}")
        if not 0 <= decay < 1:
            raise ValueError(f"auto-alpha decay must be in [0, 1), got {decay}")
        self.ratio = float(ratio)
        self.decay = float(decay)
        self.count = 0
        self.task_ema: torch.Tensor | None = None
        self.distance_ema: torch.Tensor | None = None

    def __call__(self, task_loss: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Update the averages with this step's values and return the alpha to use for this step."""
        pair = torch.stack([task_loss.detach().float(), distance.detach().float()])
        task, d = dist.all_reduce_mean(pair)  # one collective for both
        if self.task_ema is None:
            self.task_ema, self.distance_ema = torch.zeros_like(task), torch.zeros_like(d)
        self.task_ema = self.task_ema.to(task.device) * self.decay + task * (1 - self.decay)
        self.distance_ema = self.distance_ema.to(task.device) * self.decay + d * (1 - self.decay)
        self.count += 1
        # Both EMAs start at 0 with the same weights, so their bias corrections cancel in the ratio.
        alpha = self.ratio * self.task_ema / self.distance_ema.clamp_min(1e-12)
        return alpha.clamp(max=self.MAX_ALPHA)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "decay": self.decay,
            "count": self.count,
            "task_ema": None if self.task_ema is None else self.task_ema.detach().cpu(),
            "distance_ema": None if self.distance_ema is None else self.distance_ema.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratio, self.decay, self.count = float(state["ratio"]), float(state["decay"]), int(state["count"])
        self.task_ema, self.distance_ema = state["task_ema"], state["distance_ema"]


class Distiller:
    """The frozen teacher of a chain link and the weight of its distillation loss (Eq. 1, 4).

    ``alpha``: a number (fixed weight, default 500, meant at embedding width ``ref_dim``) or
    ``"auto"`` (hold L_IFD / L_task near ``ratio``); ``gate``: drop L_IFD on steps where the student
    beats its teacher; ``schedule`` / ``fraction`` / ``total_steps``: the factor on alpha along the
    run (module docstring). The projection T is *not* kept here: it is trained with the student (in
    the optimizer, synchronized by DDP), so the trainer owns it (see :func:`make_projection`).
    """

    def __init__(
        self,
        teacher: nn.Module,
        paradigm: Any,
        alpha: float | str = DEFAULT_ALPHA,
        ratio: float = DEFAULT_RATIO,
        gate: bool = False,
        *,
        ref_dim: int | None = DEFAULT_REF_DIM,
        schedule: str = "constant",
        fraction: float = 1.0,
        total_steps: int = 1,
        target: str = "feature",
    ):
        self.paradigm = paradigm  # compt.paradigms.Paradigm: which features the teacher gives
        if target not in paradigm.distill_targets:
            raise ValueError(
                f"distillation target {target!r} is not one of the {paradigm.name} paradigm's: "
                + ", ".join(paradigm.distill_targets)
            )
        self.target = target
        self.gate = bool(gate)
        if ref_dim is not None and ref_dim < 1:
            raise ValueError(f"alpha reference dim must be >= 1 (or None), got {ref_dim}")
        if not 0 < fraction <= 1:
            raise ValueError(f"alpha schedule fraction must be in (0, 1], got {fraction}")
        self.ref_dim, self.fraction, self.total_steps = ref_dim, float(fraction), max(1, int(total_steps))
        self.schedule_name, self._schedule = schedule, alpha_schedule(schedule)
        if isinstance(alpha, str):
            if alpha != "auto":
                raise ValueError(f"alpha must be a number or 'auto', got {alpha!r}")
            self.auto: AutoAlpha | None = AutoAlpha(ratio)
            self.alpha: float | None = None
        else:
            if not math.isfinite(alpha) or alpha < 0:
                raise ValueError(f"alpha must be a finite number >= 0 (or 'auto'), got {alpha}")
            self.auto, self.alpha = None, float(alpha)
        # Frozen for good: eval mode (no dropout / drop-path noise) and no parameter wants a gradient.
        self.teacher = teacher.eval().requires_grad_(False)

    def factor(self, step: int) -> float:
        """The schedule's factor on alpha for the update after ``step`` steps (a host float: no sync).

        0 means L_IFD is off this step, and the trainer skips the teacher's forward pass: always so
        at a fixed alpha of 0 (IWI only, Table 4b), where L_IFD weighs nothing on any step.
        """
        if self.alpha == 0:
            return 0.0
        return float(self._schedule(step / self.total_steps, self.fraction))

    @torch.no_grad()
    def teacher_features(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The teacher's features of the student's batch (call it inside the student's autocast)."""
        return self.paradigm.teacher_features(self.teacher, batch, self.target)

    @torch.no_grad()
    def teacher_task_loss(
        self, teacher: dict[str, torch.Tensor], out: dict[str, Any], local_batch_size: int
    ) -> torch.Tensor:
        """The teacher's task loss on the batch (for the gate), from :meth:`teacher_features`."""
        return self.paradigm.teacher_task_loss(teacher, out, local_batch_size)

    def loss(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        task_loss: torch.Tensor,
        teacher_task: torch.Tensor | None = None,
        factor: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """L_IFD of Eq. 1/4 from projected student features and the teacher's (same keys).

        Returns ``loss`` (alpha-weighted, to add to L_task), ``mse_<key>`` (``kl_<key>`` for the
        logit target) per feature, ``alpha`` (the weight applied to the mean distance: alpha x
        ``factor`` x D / ref_dim for a feature target, or auto's value x ``factor``) and
        ``distill_on`` (1: L_IFD counts this step, 0: the gate dropped it); all tensors, all but
        ``loss`` detached. ``task_loss`` is read by the ``auto`` mode and the gate, ``teacher_task``
        (:meth:`teacher_task_loss`) only by the gate, which needs it; ``factor`` is :meth:`factor`.
        """
        if set(student) != set(teacher):
            raise ValueError(
                f"student features {sorted(student)} and teacher features {sorted(teacher)} differ"
            )
        mse = {key: self.paradigm.distance(self.target, student[key], teacher[key]) for key in student}
        distance = torch.stack(list(mse.values())).mean()  # Eq. 4: averaged over the feature pairs
        if self.auto is not None:
            alpha = self.auto(task_loss, distance) * factor
        else:
            # One weight per unit of squared distance at every width (width_scale); features of
            # different widths would each need their own, so they must agree. A KL over the
            # vocabulary (the logit target) is not a per-dimension mean: no width scale.
            dims = {value.shape[-1] for value in teacher.values()}
            if len(dims) != 1:
                raise ValueError(f"a fixed alpha needs features of one width, got widths {sorted(dims)}")
            scale = width_scale(dims.pop(), self.ref_dim) if self.target == "feature" else 1.0
            weight = self.alpha * factor * scale
            # A fill on the device: torch.tensor(x, device=cuda) is a host-to-device copy that syncs.
            alpha = torch.full((), weight, device=distance.device)
        on = torch.ones((), device=distance.device)
        if self.gate:
            if teacher_task is None:
                raise ValueError("the distillation gate needs the teacher's task loss (teacher_task)")
            # A tensor, not a Python bool: no host sync per step.
            on = (task_loss.detach().float() >= teacher_task.detach().float()).float()
        return {
            "loss": on * alpha * distance,
            **{f"{_STAT[self.target]}_{key}": value.detach() for key, value in mse.items()},
            "alpha": alpha.detach(),
            "distill_on": on,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": "auto" if self.auto is not None else self.alpha,
            "auto_alpha": None if self.auto is None else self.auto.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.auto is not None and state.get("auto_alpha") is not None:
            self.auto.load_state_dict(state["auto_alpha"])
