"""AutoProg-Zero's progressive unfreezing: block groups, stage plans, fresh AdamW moments (issue 16).

Fine-tuning runs in K equal stages (AutoProg-Zero, arXiv 2410.00350: K = 4). What trains grows with
the stages along two axes:

* **unfreezing level** ``l`` in 1..K: the image tower's blocks are split into K groups spaced every
  K blocks, group g = blocks {g, g+K, g+2K, ...}; level l trains groups 0..l-1. Everything outside
  the blocks (patch embedding, class and position embeddings, ``ln_pre``/``ln_post``, the
  projection, the head, SID) always trains. A block is found by its **exact module path**
  (``visual.transformer.resblocks.1``): a parameter belongs to it when its name is that path plus
  ``.``, never by substring -- the official code's ``'blocks.1' in name`` also matches blocks 10-19,
  so its stage 2 unfreezes 20 of DiT's 28 blocks (prog/helpers.py, set_model_config).
* **resolution**: r from ``min_scale`` (0.25) to 1 of the full image size over the K stages, each
  rounded to the patch grid; evaluation always runs at full resolution.

One AdamW serves the whole run; a block unfrozen at a stage boundary starts with fresh moments and
its own step count (:func:`fresh_moments`), while the rest of the optimizer keeps its state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "StagePlan",
    "block_paths",
    "block_groups",
    "trainable_blocks",
    "block_params",
    "set_level",
    "fresh_moments",
    "enter_stage",
    "stage_resolutions",
    "manual_schedule",
    "stage_of_step",
]

# Where open_clip's VisionTransformer keeps its blocks, relative to an ImageClassifier. Other towers
# (timm Swin: blocks nested in stages) are not supported yet; block_paths says so.
_BLOCK_LIST = "visual.transformer.resblocks"


@dataclass(frozen=True)
class StagePlan:
    """What one stage trains: unfreezing ``level`` (1..K) at input ``resolution`` (px)."""

    level: int
    resolution: int


def block_paths(model: nn.Module) -> list[str]:
    """The exact module paths of the blocks in forward order: ``visual.transformer.resblocks.0``, ..."""
    blocks = dict(model.named_modules()).get(_BLOCK_LIST)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"no {_BLOCK_LIST} in {type(model).__name__}: progressive unfreezing needs an ImageClassifier "
            "around an open_clip ViT image tower"
        )
    return [f"{_BLOCK_LIST}.{i}" for i in range(len(blocks))]


def block_groups(num_blocks: int, num_stages: int) -> list[list[int]]:
    """Group g = blocks {g, g+K, g+2K, ...} for g in 0..K-1 (a group is empty when K > num_blocks)."""
    if num_blocks < 1 or num_stages < 1:
        raise ValueError(
            f"block_groups needs num_blocks >= 1 and num_stages >= 1, got {num_blocks}, {num_stages}"
        )
    return [list(range(g, num_blocks, num_stages)) for g in range(num_stages)]


def trainable_blocks(level: int, num_blocks: int, num_stages: int) -> list[int]:
    """The blocks that train at unfreezing ``level`` (1..K): groups 0..level-1, sorted."""
    if not 1 <= level <= num_stages:
        raise ValueError(f"unfreezing level {level} is outside 1..{num_stages}")
    return sorted(b for group in block_groups(num_blocks, num_stages)[:level] for b in group)


def block_params(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Each block's ``(name, parameter)`` pairs: names whose leading components equal the block's path."""
    index = {path: i for i, path in enumerate(block_paths(model))}
    out: list[list[tuple[str, nn.Parameter]]] = [[] for _ in index]
    for name, param in model.named_parameters():
        parts = name.split(".")
        # Whole components only: "resblocks.1" prefixes "resblocks.1.mlp...", never "resblocks.10...".
        hits = [index[p] for cut in range(1, len(parts)) if (p := ".".join(parts[:cut])) in index]
        if hits:
            out[hits[0]].append((name, param))
    return out


def set_level(model: nn.Module, level: int, num_stages: int) -> list[nn.Parameter]:
    """Train exactly the blocks of ``level`` (others frozen, gradients cleared); return newly unfrozen params.

    Parameters outside the blocks are left as they are (trainable unless the model froze them).
    """
    per_block = block_params(model)
    train = set(trainable_blocks(level, len(per_block), num_stages))
    newly = []
    for b, params in enumerate(per_block):
        for _, p in params:
            if b in train and not p.requires_grad:
                newly.append(p)
            p.requires_grad_(b in train)
            if b not in train:
                p.grad = None  # a zero (not None) grad would let AdamW decay and move a frozen block
    return newly


def fresh_moments(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Forget ``optimizer``'s state (AdamW moments, step count) of ``params``; return how many had state.

    The next ``step`` then initializes them as torch's AdamW does for a new parameter: zero moments
    and step 0, so their bias correction starts afresh while the other parameters keep theirs.
    """
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    cleared = 0
    for p in params:
        if id(p) not in known:
            raise ValueError(
                "fresh_moments: a parameter is not in the optimizer; build it over all parameters"
            )
        cleared += optimizer.state.pop(p, None) is not None
        p.grad = None
    return cleared


def enter_stage(
    model: nn.Module, optimizer: torch.optim.Optimizer, plan: StagePlan, num_stages: int
) -> list[nn.Parameter]:
    """Apply ``plan``'s unfreezing level at a stage boundary; newly unfrozen blocks get fresh moments."""
    newly = set_level(model, plan.level, num_stages)
    fresh_moments(optimizer, newly)
    return newly


def stage_resolutions(
    image_size: int, patch_size: int, num_stages: int, min_scale: float = 0.25
) -> list[int]:
    """K resolutions from ``min_scale`` to 1 of ``image_size``, each rounded (half up) to the patch grid."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    if num_stages < 1 or image_size % patch_size:
        raise ValueError(
            f"need num_stages >= 1 and image_size a multiple of patch_size ({image_size}, {patch_size})"
        )
    scales = [min_scale + (1 - min_scale) * s / max(1, num_stages - 1) for s in range(num_stages)]
    return [max(patch_size, math.floor(f * image_size / patch_size + 0.5) * patch_size) for f in scales]


def manual_schedule(
    image_size: int, patch_size: int, num_stages: int = 4, min_scale: float = 0.25
) -> list[StagePlan]:
    """The fixed schedule: stage s trains level s+1 (groups 0..s) at the s-th resolution."""
    res = stage_resolutions(image_size, patch_size, num_stages, min_scale)
    return [StagePlan(level=s + 1, resolution=r) for s, r in enumerate(res)]


def stage_of_step(step: int, total_steps: int, num_stages: int) -> int:
    """The stage of optimizer step ``step`` (0-based) when ``total_steps`` are split into K equal stages.

    Stage s starts at ``floor(s * total_steps / K)``, as AutoProg's linspace(0, epochs, K+1)[:-1].
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside 0..{total_steps - 1}")
    return max(s for s in range(num_stages) if s * total_steps // num_stages <= step)
