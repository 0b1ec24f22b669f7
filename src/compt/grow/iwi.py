"""Inverse weight initialization (IWI, paper §3.1.1, App. D.1, Fig. A, Table H): grow a trained small member
into the initialization of the next, larger member of its chain.

::

    from compt.families import create
    from compt.grow import grow

    teacher, student = create("tiny-XS"), create("tiny-S")   # teacher: a trained checkpoint in practice
    report = grow(teacher, student)                          # width="insert", depth="duplicate"
    print(report.format())

Width strategies (Fig. A a-c, Table H) map each :class:`~compt.grow.layout.Space` (a residual width,
one layer's heads, one layer's MLP units) from teacher size to student size; depth strategies
(Fig. A d-f) say which teacher layer each student layer starts from, per stack of layers (a tower, a
Swin stage). Which tensor axis is which space is the paradigm's layout (for CLIP,
:mod:`compt.paradigms.clip.layout`).
Both are registries (:mod:`compt.grow.strategies`): a new strategy is one decorated function::

    @register_width("zeros")           # fn(n_teacher, n_student, ctx) -> Map1D
    def zeros(n_t, n_s, ctx): ...

    @register_depth("last")            # fn(n_teacher, n_student) -> [teacher layer or None] * n_student
    def last(n_t, n_s): ...

For CLIP, ``logit_scale`` (and ``logit_bias``, if present) is copied from the teacher, as the official
code does.

Function-preserving growth (issue 13): ``hypercloning`` tiles every unit and breaks the copies'
symmetry with cancelling noise; ``msg`` leaves new units fresh and returns the masks that hide them
(:attr:`GrowReport.masks`, :mod:`compt.grow.masks`). :func:`grow_moments` grows a teacher's AdamW
moments with its weights (staged training).
Everything works on state dicts (:func:`grow_state_dict`, a pure function); :func:`grow` is the thin
wrapper for models and checkpoint payloads.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compt.grow.layout import GrowError, GrowLayout, Rule
from compt.grow.masks import GrowthMask
from compt.grow.strategies import (
    AxisContext,
    Map1D,
    WidthStrategy,
    axis_map,
    depth_map,
    grow_tensor,
    list_depth_strategies,
    list_width_strategies,
    register_depth,
    register_width,
    width_strategy,
)

__all__ = [
    "GrowError",
    "GrowReport",
    "TensorGrowth",
    "Map1D",
    "AxisContext",
    "grow",
    "grow_state_dict",
    "grow_moments",
    "register_width",
    "register_depth",
    "list_width_strategies",
    "list_depth_strategies",
    "depth_map",
    "strip_prefixes",
]


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorGrowth:
    """How much of one student tensor came from the teacher."""

    source: str | None  # the teacher tensor (None: fresh)
    numel: int
    inherited: int  # entries computed from the teacher

    @property
    def status(self) -> str:
        return "fresh" if self.inherited == 0 else "full" if self.inherited == self.numel else "partial"

    @property
    def fraction(self) -> float:
        return self.inherited / self.numel if self.numel else 1.0


@dataclass
class GrowReport:
    """Per student tensor: fully inherited, partly inherited (with the fraction) or fresh."""

    width: str
    depth: str
    seed: int
    tensors: dict[str, TensorGrowth] = field(default_factory=dict)
    depth_maps: dict[str, list[int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    masks: GrowthMask | None = None  # what a `masked` strategy (msg) hides until training ramps it in

    def summary(self) -> dict[str, Any]:
        """Counts of full/partial/fresh tensors and the fraction of parameters inherited."""
        counts = {"full": 0, "partial": 0, "fresh": 0}
        for t in self.tensors.values():
            counts[t.status] += 1
        params = sum(t.numel for t in self.tensors.values())
        inherited = sum(t.inherited for t in self.tensors.values())
        return {
            "width": self.width,
            "depth": self.depth,
            "seed": self.seed,
            "tensors": len(self.tensors),
            **counts,
            "params": params,
            "params_inherited": inherited,
            "fraction_inherited": inherited / params if params else 0.0,
            "depth_maps": self.depth_maps,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary plus every tensor (source, numel, inherited, status), JSON-ready."""
        per = {
            k: {"source": t.source, "numel": t.numel, "inherited": t.inherited, "status": t.status}
            for k, t in self.tensors.items()
        }
        return {**self.summary(), "per_tensor": per}

    def format(self) -> str:
        """A compact human-readable summary."""
        s = self.summary()
        lines = [
            f"width={s['width']} depth={s['depth']}: {s['tensors']} tensors: {s['full']} full, "
            f"{s['partial']} partial, {s['fresh']} fresh; {100 * s['fraction_inherited']:.1f}% of "
            f"{s['params'] / 1e6:.2f}M parameters inherited"
        ]
        for name, layers in self.depth_maps.items():
            n_t = 1 + max((i for i in layers if i is not None), default=-1)
            if len(layers) != n_t or layers != list(range(n_t)):
                lines.append(f"  depth {name}: {n_t} -> {len(layers)} layers {_short(layers)}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.masks is not None:  # compt grow writes the raw weights: the masks live in training
            lines.append(
                f"  masks: {len(self.masks.axes)} tensors masked, {len(set(self.masks.layers.values()))} "
                "new layers; they hide the new units only while `compt train` ramps them "
                "(train.mask_ramp_fraction)"
            )
        return "\n".join(lines)


def _short(layers: list[int | None]) -> str:
    text = ",".join("-" if i is None else str(i) for i in layers)
    return f"[{text}]" if len(text) <= 80 else f"[{text[:77]}...]"


# --- the pure function on state dicts ------------------------------------------------------------


_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) key prefixes, in any combination."""
    out = {}
    for k, v in sd.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def grow_state_dict(
    teacher_sd: Mapping[str, torch.Tensor],
    teacher_cfg: Mapping[str, Any],
    student_sd: Mapping[str, torch.Tensor],
    student_cfg: Mapping[str, Any],
    *,
    width: str = "insert",
    depth: str = "duplicate",
    seed: int = 0,
    interpolate_pos: bool = False,
    in_place: bool = False,
    paradigm: str | None = None,
) -> tuple[dict[str, torch.Tensor], GrowReport]:
    """Grow ``teacher_sd`` into a new student state dict; returns ``(new_student_sd, report)``.

    ``*_cfg`` are the paradigm's model configs, as stored in a compt checkpoint's ``model_cfg``
    (open_clip configs for CLIP, the default ``paradigm``). ``student_sd`` supplies the random init of
    every entry not inherited. A pure function unless ``in_place=True``, which writes into
    ``student_sd``'s tensors (saving a copy of the student; nothing is written unless every check passes).
    """
    layout = _layout(paradigm)
    return _grow(
        teacher_sd,
        layout.hints_from_cfg(teacher_cfg, "teacher"),
        student_sd,
        layout.hints_from_cfg(student_cfg, "student"),
        layout,
        width,
        depth,
        seed,
        interpolate_pos,
        in_place,
    )


def _layout(paradigm: str | None) -> GrowLayout:
    from compt.paradigms import get_paradigm

    return get_paradigm(paradigm).layout


def _grow(
    t_sd,
    t_hints: Any,
    s_sd,
    s_hints: Any,
    layout: GrowLayout,
    width: str,
    depth: str,
    seed: int,
    interpolate_pos: bool,
    in_place: bool,
) -> tuple[dict[str, torch.Tensor], GrowReport]:
    strategy = width_strategy(width)
    depth_map(depth, 1, 1)  # an unknown name fails here, before any work
    t_sd, s_sd = strip_prefixes(t_sd), strip_prefixes(s_sd)
    plan = layout.plan(
        t_sd,
        t_hints,
        s_sd,
        s_hints,
        depth=lambda a, b: depth_map(depth, a, b),
        width=width,
        interpolate_pos=interpolate_pos,
    )
    report = GrowReport(width, depth, seed, depth_maps=plan.depth_maps, notes=list(plan.notes))
    t_sd, rules = plan.teacher_sd, plan.rules
    jobs = _jobs(rules, t_sd, s_sd, strategy, seed)
    out: dict[str, torch.Tensor] = {}
    for key, s_val, rule, maps in jobs:
        if maps is None:  # fresh: the student's own init
            out[key], inherited = (s_val if in_place else s_val.detach().clone()), 0
        else:
            out[key], inherited = grow_tensor(
                t_sd[rule.source], s_val, maps, in_place, _noise(strategy, maps, seed, key)
            )
        report.tensors[key] = TensorGrowth(rule.source if inherited else None, s_val.numel(), inherited)
    if strategy.masked:
        students = {key: rule for key, _, rule, _ in jobs}  # the layout knows more tensors than exist
        report.masks = GrowthMask.plan(students, plan.depth_maps, plan.branch_outputs)
    return out, report


def _jobs(rules: Mapping[str, Rule], t_sd, s_sd, strategy: WidthStrategy, seed: int) -> list[tuple]:
    """Every student tensor with its rule and per-axis maps. Planned before anything is written
    (this is where bad input raises), so an error leaves the student as it was."""
    cache: dict = {}
    jobs = []
    for key, s_val in s_sd.items():
        if key not in rules:
            raise GrowError(
                f"no grow rule for student tensor {key!r} {tuple(s_val.shape)}; the paradigm's grow "
                "layout does not know it (see compt/paradigms/<paradigm>/layout.py)"
            )
        jobs.append((key, s_val, rules[key], _maps(rules[key], t_sd, s_val, strategy, seed, cache)))
    return jobs


def _noise(strategy: WidthStrategy, maps: list[Map1D | None], seed: int, key: str):
    """``(snr_db, generator)`` for a tensor whose maps carry noise pairs (HyperCloning), else None."""
    if strategy.noise_snr_db is None or not any(m is not None and m.pairs is not None for m in maps):
        return None
    return strategy.noise_snr_db, torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def _maps(
    rule: Rule, t_sd, s_val: torch.Tensor, strategy: WidthStrategy, seed: int, cache: dict
) -> list[Map1D | None] | None:
    """The per-axis maps of one student tensor (``None``: the tensor stays fresh)."""
    if rule.source is None or not strategy.inherits:
        return None
    if rule.source not in t_sd:
        raise GrowError(
            f"the teacher has no tensor {rule.source!r} for the student's; towers differ in structure"
        )
    t_val = t_sd[rule.source]
    if t_val.dim() != s_val.dim() or t_val.dim() != len(rule.axes):
        raise GrowError(
            f"{rule.source}: teacher shape {tuple(t_val.shape)} / student shape "
            f"{tuple(s_val.shape)} do not fit its layout ({len(rule.axes)} axes)"
        )
    if not strategy.structured and t_val.dim() == 3:
        return None  # bug for bug: the official code skips 3-D tensors
    return [
        axis_map(a, nt, ns, strategy, seed, cache, f"{rule.source} axis {d}")
        for d, (a, nt, ns) in enumerate(zip(rule.axes, t_val.shape, s_val.shape, strict=True))
    ]


# --- models and checkpoints ----------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _source(obj: Any, who: str) -> tuple[Mapping[str, torch.Tensor], Any, GrowLayout]:
    from compt.paradigms import get_paradigm, paradigm_of_model

    if isinstance(obj, (str, Path)):
        from compt.engine.checkpoint import load_checkpoint

        obj = load_checkpoint(obj)
    if isinstance(obj, nn.Module):
        model = _unwrap(obj)
        try:
            layout = paradigm_of_model(model).layout
        except ValueError as e:
            raise GrowError(f"the {who}: {e}") from e
        return model.state_dict(), layout.hints_from_model(model, who), layout
    if isinstance(obj, Mapping) and "model" in obj and "model_cfg" in obj:
        layout = get_paradigm(obj.get("paradigm")).layout
        return obj["model"], layout.hints_from_cfg(obj["model_cfg"], who), layout
    raise GrowError(
        f"the {who} must be a model (e.g. an open_clip CLIP), a checkpoint payload with 'model' and "
        f"'model_cfg', or a checkpoint path; got {type(obj).__name__}"
    )


def grow(
    teacher: Any,
    student: Any,
    width: str = "insert",
    depth: str = "duplicate",
    seed: int = 0,
    *,
    interpolate_pos: bool = False,
) -> GrowReport:
    """Initialize ``student`` in place from ``teacher`` by inverse weight initialization (§3.1.1).

    ``teacher``: an open_clip ``CLIP``, a compt checkpoint payload (``model`` + ``model_cfg``) or a
    checkpoint path. ``student``: a ``CLIP`` (its parameters are overwritten) or a payload (its
    ``model`` entry is replaced). ``width``/``depth``: registered strategies (:func:`list_width_strategies`,
    :func:`list_depth_strategies`); ``seed`` drives Net2Net's random unit choices; ``interpolate_pos``
    resamples the teacher's positional-embedding grid when image sizes differ.
    """
    if isinstance(student, (str, Path)):
        raise GrowError(
            "the student must be a CLIP or a checkpoint payload (it is initialized in place), "
            "not a path; load it first, or use `compt grow --out`"
        )
    t_sd, t_hints, layout = _source(teacher, "teacher")
    s_sd, s_hints, s_layout = _source(student, "student")
    if s_layout is not layout:
        raise GrowError("the teacher and the student are models of different paradigms")
    # A module's state-dict tensors share storage with its parameters: writing them in place is the init.
    new_sd, report = _grow(
        t_sd,
        t_hints,
        s_sd,
        s_hints,
        layout,
        width,
        depth,
        seed,
        interpolate_pos,
        in_place=isinstance(student, nn.Module),
    )
    if not isinstance(student, nn.Module):
        student["model"] = new_sd
    return report


# --- optimizer state (issue 13: staged training's hand-over) ---------------------------------------


def _moment_map(m: Map1D | None, role: str, power: int) -> Map1D | None:
    """How an AdamW moment grows along one axis, from the weights' map.

    Under function-preserving copying, a student entry that copies teacher entry i receives the
    teacher's gradient divided by the number of copies of i along the axes it *produces* (the
    consumers split it), and unchanged along the axes it consumes (its input is copied). So the first
    moment is scaled by s = prod_out 1/copies and the second by s^2: a width doubling halves the first
    and quarters the second (Shen et al. 2022). A fresh entry gets zero moments (as MSG does); an entry
    mixed from several teacher entries (``interpolate``) follows its largest weight.
    """
    if m is None:
        return None
    primary = m.src.gather(1, m.weight.abs().argmax(1, keepdim=True))[:, 0]
    scale = torch.ones(len(primary))
    if role == "out":
        copies = torch.bincount(primary[m.inherited], minlength=int(primary.max()) + 1).clamp_min(1)
        scale = 1.0 / copies[primary].float()
    return Map1D(primary[:, None], scale[:, None] ** power, m.inherited)


def grow_moments(
    teacher: Mapping[str, Any],
    student: nn.Module,
    width: str = "insert",
    depth: str = "duplicate",
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """The student's AdamW moments grown from a teacher checkpoint payload's ``moments`` (issue 13).

    ``teacher["moments"]`` maps parameter names to ``exp_avg``, ``exp_avg_sq`` and ``step`` (written
    by a run with ``keep_moments``). Returns the same for every student parameter that grows from a
    teacher tensor (see :func:`_moment_map` for the rule); parameters without a teacher tensor are
    left out (they start with fresh AdamW state). ``width``/``depth``/``seed``: as the weights grew.
    """
    moments = teacher.get("moments")
    if not moments:
        raise GrowError(
            "the teacher checkpoint holds no AdamW moments; train it with keep_moments: true "
            "(compt chain sets it for the teacher of a link with optimizer_init: grown)"
        )
    t_sd, t_hints, layout = _source(teacher, "teacher")
    s_sd, s_hints, _ = _source(student, "student")
    strategy = width_strategy(width)
    t_sd, s_sd = strip_prefixes(t_sd), strip_prefixes(s_sd)
    plan = layout.plan(
        t_sd,
        t_hints,
        s_sd,
        s_hints,
        depth=lambda a, b: depth_map(depth, a, b),
        width=width,
        interpolate_pos=False,
    )
    params = {name for name, _ in student.named_parameters()}
    out: dict[str, dict[str, Any]] = {}
    for key, s_val, rule, maps in _jobs(plan.rules, plan.teacher_sd, s_sd, strategy, seed):
        held = moments.get(rule.source) if rule.source is not None else None
        if (
            key not in params
            or maps is None
            or held is None
            or held["exp_avg"].shape != t_sd[rule.source].shape
        ):
            continue
        zeros = torch.zeros_like(s_val, dtype=torch.float32)
        grown = {}
        for name, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            mmaps = [_moment_map(m, a.role, power) for m, a in zip(maps, rule.axes, strict=True)]
            grown[name] = grow_tensor(held[name], zeros, mmaps, in_place=False)[0]
        out[key] = grown | {"step": int(held["step"])}
    return out
