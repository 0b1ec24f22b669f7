"""Inverse weight initialization (paper §3.1.1, App. D.1): grow a trained member into the next one.

- :mod:`compt.grow.iwi`: :func:`grow` / :func:`grow_state_dict` and the per-tensor report;
- :mod:`compt.grow.strategies`: the width and depth strategy registries (insert, duplicate, net2net,
  hypercloning, msg, ...);
- :mod:`compt.grow.masks`: MSG's growth masks, ramped in during training (issue 13);
- a paradigm supplies the layout of its state dicts (which axis of which tensor is which width),
  e.g. :mod:`compt.paradigms.clip.layout` for open_clip CLIP models.
"""

from compt.grow.iwi import (
    AxisContext,
    GrowError,
    GrowReport,
    Map1D,
    TensorGrowth,
    depth_map,
    grow,
    grow_moments,
    grow_state_dict,
    list_depth_strategies,
    list_width_strategies,
    register_depth,
    register_width,
    strip_prefixes,
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
