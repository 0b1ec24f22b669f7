"""The models of AutoProg-One's stages (Li et al., CVPR 2022; journal arXiv 2410.00350): real, shallower
open_clip CLIPs, grown into each other by MoGrow, run at lower resolutions and as sub-nets of a supernet.

- A stage trains an open_clip ``CLIP`` with the member's widths and fewer blocks per tower
  (:func:`compt.engine.progressive.stage_member`). At a growth the next stage's model is initialized by
  compt.grow (widths unchanged, depth by adjacent duplication, 4 -> 8 = 0,0,1,1,2,2,3,3) from the EMA
  of the weights (MoGrow; official main_prog.py:1382), and the EMA itself is grown from the previous EMA.
- AdamW's moments are carried across a growth with the layers they belong to
  (:func:`compt.engine.progressive_train.carry_adamw_state`); the official code resets them
  (main_prog.py:1428).
- Lower resolution: each batch is downsampled on its device (:func:`resize_images`) and the ViT runs on
  the smaller patch grid with its full-size positional embedding interpolated, bicubic, at every forward
  (:func:`encode_image`; official models/volo.py:580-596). Evaluation stays at full resolution.
- A search's sub-net runs only some blocks of the supernet (:func:`active_layers`), the others act as
  identity; after the search the chosen sub-net is taken out of the supernet (:func:`extract_subnet`).

:class:`ClipProgressive` is what the engine calls (:class:`compt.engine.progressive_train.ProgressiveOps`,
through :meth:`compt.paradigms.clip.ClipParadigm.progressive_ops`). What here is open_clip-specific
(the tower paths, the positional embedding) is marked; the rest only needs a state dict and a layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from timm.layers import resample_abs_pos_embed
from timm.utils import ModelEmaV3
from torch import nn
from torch.func import functional_call

from compt.engine.progressive import Shape, stage_member
from compt.engine.progressive_train import ProgressiveOps, StageModel
from compt.families import Member
from compt.grow import grow

__all__ = [
    "resize_images",
    "resample_pos_embed",
    "encode_image",
    "active_layers",
    "build_stage",
    "grow_stage",
    "extract_subnet",
    "candidate_loss",
    "ClipProgressive",
]

# open_clip: where each tower keeps its blocks (the names compt.grow's depth maps use).
_BLOCKS = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}


# --- lower resolution --------------------------------------------------------------------------------


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A batch ``[B, 3, H, W]`` resized to ``size x size`` on its device (bilinear, as the official code,
    main_prog.py:1925; antialiased, as a loader's resize would be); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A ViT positional embedding ``[1 + g*g, C]`` on a ``grid x grid`` patch grid (bicubic, class row
    kept; differentiable, so the full-size parameter is what trains)."""
    if pos.shape[0] == grid * grid + 1:
        return pos
    return resample_abs_pos_embed(pos[None], [grid, grid], num_prefix_tokens=1, antialias=False)[0]


def encode_image(model: CLIP, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_image`` at any square input a whole number of patches wide (open_clip ViT).

    open_clip's VisionTransformer adds its fixed-size ``positional_embedding``; here the forward runs
    with that parameter interpolated to the input's grid, the model itself unchanged.
    """
    visual = model.visual
    # The model's own size, or not open_clip's ViT (e.g. a timm Swin, which runs at its own size only).
    if not hasattr(visual, "grid_size") or tuple(images.shape[-2:]) == tuple(visual.image_size):
        return model.encode_image(images, normalize=normalize)
    patch, (h, w) = visual.patch_size[0], images.shape[-2:]
    if h != w or h % patch:
        raise ValueError(
            f"encode_image needs square images a multiple of the {patch}-pixel patch, got {h}x{w}"
        )
    pos = resample_pos_embed(visual.positional_embedding, h // patch)
    features = functional_call(visual, {"positional_embedding": pos}, (images,))
    return F.normalize(features, dim=-1) if normalize else features


# --- sub-nets of the supernet ---------------------------------------------------------------------------


@contextmanager
def active_layers(model: CLIP, keep: Mapping[str, Iterable[int]] | None) -> Iterator[None]:
    """Within the block, each tower runs only blocks ``keep[tower]`` (the others act as identity).

    Wrap the forward only: the skipped blocks are out of the module tree meanwhile, so take state dicts,
    EMA updates and optimizer steps outside. Skipped blocks get no gradient (``None``): under DDP wrap
    the supernet with ``find_unused_parameters=True`` and sample the same candidate on every rank, so the
    unused set is the same everywhere and DDP leaves their gradients ``None``, as one process would.
    """
    if keep is None:
        yield
        return
    owners = {t: model.get_submodule(_BLOCKS[t].rsplit(".", 1)[0]) for t in keep}
    saved = {t: owner.resblocks for t, owner in owners.items()}
    try:
        for t, owner in owners.items():
            owner.resblocks = nn.ModuleList(saved[t][i] for i in keep[t])
        yield
    finally:
        for t, owner in owners.items():
            owner.resblocks = saved[t]


# --- stage models ----------------------------------------------------------------------------------------


def _create(member: Member, device: torch.device, seed: int) -> CLIP:
    """A fresh model, seeded, without touching the training RNG streams."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return member.create(device).train()


def build_stage(member: Member, depth: Shape, *, decay: float, seed: int, device: torch.device) -> StageModel:
    """The first stage's model: ``member`` with ``depth``'s blocks, freshly initialized, and its EMA."""
    m = stage_member(member, depth)
    model = _create(m, torch.device(device), seed)
    return StageModel(model, ModelEmaV3(model, decay=decay), m, {})


def grow_stage(
    prev: StageModel, member: Member, depth: Shape, *, decay: float, mogrow: bool = True, seed: int = 0
) -> StageModel:
    """The next stage's model grown from ``prev`` by compt.grow (depth: adjacent duplication).

    MoGrow (``mogrow=True``): the weights come from ``prev``'s EMA, the pre-growth online weights are
    dropped. Plain growth: from the online weights. Either way the new EMA is grown from the old EMA.
    """
    m = stage_member(member, depth)
    device = next(prev.model.parameters()).device
    model = _create(m, device, seed)
    report = grow(prev.ema.module if mogrow else prev.model, model, width="insert", depth="duplicate")
    ema = ModelEmaV3(model, decay=decay)
    if not mogrow:
        grow(prev.ema.module, ema.module, width="insert", depth="duplicate")
    source = {k: t.source for k, t in report.tensors.items() if t.source is not None}
    return StageModel(model, ema, m, source, report)


def extract_subnet(
    prev: StageModel, member: Member, keep: Mapping[str, Iterable[int]], *, decay: float, seed: int = 0
) -> StageModel:
    """The sub-net that runs blocks ``keep[tower]`` of ``prev``'s supernet, as a model of its own: its
    online weights, and its EMA from the supernet's EMA (official: main_prog.py:1362, ``load_super``)."""
    keep = {t: list(v) for t, v in keep.items()}
    depth = Shape(len(keep["visual"]), len(keep["text"]), member.image_size)
    m = stage_member(member, depth)
    model = _create(m, next(prev.model.parameters()).device, seed)
    source = {k: _block_source(k, keep) for k in model.state_dict()}
    online, averaged = prev.model.state_dict(), prev.ema.module.state_dict()
    model.load_state_dict({k: online[s] for k, s in source.items()})
    ema = ModelEmaV3(model, decay=decay)
    ema.module.load_state_dict({k: averaged[s] for k, s in source.items()})
    return StageModel(model, ema, m, source)


def _block_source(key: str, keep: Mapping[str, list[int]]) -> str:
    for tower, prefix in _BLOCKS.items():
        hit = re.match(re.escape(prefix) + r"\.(\d+)\.", key)
        if hit:
            return f"{prefix}.{keep[tower][int(hit.group(1))]}.{key[hit.end() :]}"
    return key


@torch.no_grad()
def candidate_loss(
    model: CLIP,
    keep: Mapping[str, Iterable[int]] | None,
    image_size: int,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[CLIP, torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """A search candidate's L: the mean no-grad ``loss_fn(model, images, texts)`` of the sub-net ``keep``
    on ``batches`` downsampled to ``image_size`` (official: train-mode loss of the EMA, main_prog.py:1892)."""
    with active_layers(model, keep):
        losses = [loss_fn(model, resize_images(images, image_size), texts) for images, texts in batches]
    if not losses:
        raise ValueError("candidate_loss needs at least one batch")
    return float(torch.stack([loss.float() for loss in losses]).mean())


# --- what the engine calls -------------------------------------------------------------------------------

# The scoring batches of a search come from this data seed offset: for the embedded set other scenes of
# the training distribution (scene i is a function of (seed, i)); for a table, a fixed draw of its rows.
SCORING_SEED_OFFSET = 7919


class ClipProgressive(ProgressiveOps):
    """AutoProg-One's model operations on open_clip ViT CLIPs (module docstring)."""

    def build_stage(self, member, depth, *, decay, seed, device):
        return build_stage(member, depth, decay=decay, seed=seed, device=device)

    def grow_stage(self, prev, member, depth, *, decay, mogrow, seed):
        return grow_stage(prev, member, depth, decay=decay, mogrow=mogrow, seed=seed)

    def extract_subnet(self, prev, member, keep, *, decay, seed):
        return extract_subnet(prev, member, keep, decay=decay, seed=seed)

    def resize(self, batch, image_size):
        images, *rest = batch
        return (resize_images(images, image_size), *rest)

    def active_layers(self, model, keep):
        return active_layers(model, keep)

    def candidate_loss(self, model, keep, image_size, batches, local_batch_size):
        from compt.paradigms.clip import task

        def loss(m: CLIP, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            return task.task_loss(task.StudentForward(m, nn.Identity())(images, texts), local_batch_size)

        return candidate_loss(model, keep, image_size, batches, loss)

    def scoring_data(self, data_cfg):
        return replace(data_cfg, seed=data_cfg.seed + SCORING_SEED_OFFSET, workers=0)
