"""The vocabulary in which a paradigm tells compt.grow how its tensors grow (paper §3.1.1, App. D.1).

Inverse weight initialization copies a small teacher into a larger student. A shape-only copy goes
wrong as soon as a dimension is *packed* (attention's q/k/v stacked in one tensor, heads of a fixed
width, Swin's PatchMerging over 4 neighbours), so every paradigm names, for each tensor of its
models, what each axis indexes:

- a :class:`Space` is one width shared by several tensors: a residual width, one layer's heads
  (``units`` = heads, ``dims`` = head width), one layer's MLP hidden units, an embedding. Width
  strategies (:mod:`compt.grow.strategies`) map spaces, so every tensor of a layer agrees on which
  teacher head feeds which student head;
- an :class:`Axis` places a space in a tensor: ``groups`` packed copies (3 for q/k/v),
  ``with_dims=False`` for one entry per head, ``role="in"`` when the tensor consumes the space (its
  columns), which function-preserving strategies need to split outgoing weights;
- a :class:`Rule` says which teacher tensor a student tensor grows from, axis by axis.

A paradigm's :class:`GrowLayout` turns two state dicts into a :class:`GrowPlan` (every student
tensor's rule and the depth map of every stack of layers); :func:`compt.grow.grow_state_dict`
applies it. The CLIP layout is :mod:`compt.paradigms.clip.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["GrowError", "Space", "Axis", "FIXED", "Rule", "GrowPlan", "GrowLayout", "DepthFn"]


class GrowError(ValueError):
    """A teacher cannot be grown into a student (sizes, kinds or tensors do not fit)."""


@dataclass(frozen=True)
class Space:
    """One width shared by several tensors: ``units`` (e.g. heads) of ``dims`` entries (e.g. head width)."""

    key: str
    units_t: int
    units_s: int
    dims_t: int = 1
    dims_s: int = 1
    normed: bool = False  # normalized over (LayerNorm, RMSNorm, or CLIP's L2 norm of the embedding)


@dataclass(frozen=True)
class Axis:
    """One axis of a tensor: ``groups`` packed copies of a space (``None``: sizes must be equal)."""

    space: Space | None = None
    role: str = "out"  # "out": the tensor produces the space (rows); "in": it consumes it (columns)
    groups: int = 1
    with_dims: bool = True  # False: one entry per unit (a bias-table column per head)


FIXED = Axis()


@dataclass(frozen=True)
class Rule:
    """How one student tensor is grown: from teacher tensor ``source`` (``None``: keep its init)."""

    source: str | None
    axes: tuple[Axis, ...]


DepthFn = Callable[[int, int], list]  # (teacher layers, student layers) -> teacher layer per student layer


@dataclass
class GrowPlan:
    """A layout's answer for one teacher/student pair."""

    rules: dict[str, Rule]  # every student tensor
    depth_maps: dict[str, list[int | None]]  # per stack of layers: student layer -> teacher layer
    teacher_sd: Mapping[str, torch.Tensor]  # the teacher's tensors, possibly resampled (e.g. a pos grid)
    notes: list[str] = field(default_factory=list)  # what the report should tell (resampling, inexactness)
    # student tensors whose output a block adds to its residual stream -> (stack, layer): where MSG
    # masks a new layer (compt.grow.masks); a layout that leaves it empty gets no depth masks
    branch_outputs: dict[str, tuple[str, int]] = field(default_factory=dict)


class GrowLayout(Protocol):
    """What a paradigm supplies to compt.grow: hints about its models, and the plan of a pair.

    *Hints* are what a state dict's shapes do not tell (head counts, the kind of tower), read from a
    model config (a checkpoint's ``model_cfg``) or from a live model.
    """

    def hints_from_cfg(self, cfg: Mapping[str, Any], who: str) -> Any: ...

    def hints_from_model(self, model: torch.nn.Module, who: str) -> Any: ...

    def plan(
        self,
        teacher_sd: Mapping[str, torch.Tensor],
        teacher_hints: Any,
        student_sd: Mapping[str, torch.Tensor],
        student_hints: Any,
        *,
        depth: DepthFn,
        width: str,
        interpolate_pos: bool,
    ) -> GrowPlan: ...
