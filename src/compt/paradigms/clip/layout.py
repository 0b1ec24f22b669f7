"""How an open_clip CLIP grows (paper §3.1.1, App. D.1): which axis of which tensor is which width.

IWI copies a small teacher into a larger student. A shape-only copy goes wrong as soon as a dimension
is *packed*: attention's ``in_proj_weight`` stacks q, k and v (each ``heads x head_width``), Swin's
``PatchMerging`` concatenates 4 neighbours, a relative-position-bias table has one column per head.
This module names, in :mod:`compt.grow.layout`'s vocabulary (spaces, axes, rules), what each axis of
every tensor of an open_clip ``CLIP`` (ViT or timm-Swin vision tower, text tower) indexes: a tower's
residual width, one layer's heads (``units`` = heads, ``dims`` = head width), one layer's MLP hidden
units, the joint embedding; q/k/v are 3 packed groups of the heads, PatchMerging 4 of the previous
stage's width, a relative-position-bias table has one column per head (``with_dims=False``).

Everything is read from state-dict shapes plus the head counts (:class:`ClipHints`), so it works on
checkpoints as well as on models. :data:`LAYOUT` is the CLIP paradigm's
:class:`~compt.grow.layout.GrowLayout`; :mod:`compt.grow` applies the strategies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compt.grow.layout import FIXED, Axis, DepthFn, GrowError, GrowPlan, Rule, Space

__all__ = ["Stack", "ModelSpec", "ClipHints", "ClipLayout", "LAYOUT", "describe", "check_growable", "plan"]


@dataclass(frozen=True)
class Stack:
    """A run of identical blocks sharing one residual width (a ViT/text tower, a Swin stage)."""

    name: str  # "visual", "text", "visual.stage2"
    prefix: str  # block i lives under f"{prefix}.{i}."
    width: int
    layers: int
    heads: int
    mlp: int  # hidden units of the MLP
    kind: str  # "clip" (open_clip ResidualAttentionBlock) or "swin" (timm SwinTransformerBlock)

    @property
    def head_width(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of one CLIP as far as growing needs them (read from a state dict and head counts)."""

    vision_kind: str  # "vit" or "swin"
    vision: tuple[Stack, ...]  # one stack for a ViT, one per stage for a Swin
    text: Stack
    embed_dim: int
    patch_size: int
    image_size: int
    grid: int  # ViT: patches per side (the positional embedding's grid); Swin: 0
    window: int  # Swin: rows of the relative-position-bias table ((2w-1)^2); ViT: 0
    context_length: int
    vocab_size: int


def _layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _shape(sd: Mapping[str, torch.Tensor], key: str, who: str) -> torch.Size:
    if key not in sd:
        raise GrowError(
            f"the {who} state dict has no tensor {key!r}; compt.grow handles open_clip CLIP models "
            "with a ViT or timm-Swin vision tower and a transformer text tower"
        )
    return sd[key].shape


def describe(
    sd: Mapping[str, torch.Tensor],
    *,
    vision_kind: str,
    vision_heads: int | None,
    text_heads: int,
    image_size: int,
    who: str,
) -> ModelSpec:
    """Read a CLIP's sizes from its state dict; ``vision_heads`` is ignored for Swin (read from tables)."""
    if vision_kind == "vit":
        width = _shape(sd, "visual.class_embedding", who)[0]
        patch = _shape(sd, "visual.conv1.weight", who)[-1]
        tokens = _shape(sd, "visual.positional_embedding", who)[0]
        prefix = "visual.transformer.resblocks"
        vision = (_clip_stack(sd, "visual", prefix, width, vision_heads, who),)
        grid, window = round((tokens - 1) ** 0.5), 0
        if grid * grid + 1 != tokens:
            raise GrowError(f"{who}: visual.positional_embedding has {tokens} rows, not a square grid + 1")
        image_size = grid * patch
    elif vision_kind == "swin":
        patch = _shape(sd, "visual.trunk.patch_embed.proj.weight", who)[-1]
        vision = tuple(_swin_stage(sd, s, who) for s in range(_layers(sd, "visual.trunk.layers")))
        if not vision:
            raise GrowError(f"the {who} state dict has no visual.trunk.layers.*: not a timm Swin tower")
        grid = 0
        window = _shape(sd, "visual.trunk.layers.0.blocks.0.attn.relative_position_bias_table", who)[0]
    else:
        raise GrowError(
            f"{who}: vision tower {vision_kind!r} is not supported; compt.grow handles ViT and Swin"
        )
    tok = _shape(sd, "token_embedding.weight", who)
    text = _clip_stack(sd, "text", "transformer.resblocks", tok[1], text_heads, who)
    return ModelSpec(
        vision_kind=vision_kind,
        vision=vision,
        text=text,
        embed_dim=_shape(sd, "text_projection", who)[1],
        patch_size=patch,
        image_size=image_size,
        grid=grid,
        window=window,
        context_length=_shape(sd, "positional_embedding", who)[0],
        vocab_size=tok[0],
    )


def _clip_stack(sd, name: str, prefix: str, width: int, heads: int | None, who: str) -> Stack:
    layers = _layers(sd, prefix)
    if layers == 0:
        raise GrowError(f"the {who} state dict has no {prefix}.* blocks")
    if not heads or width % heads:
        raise GrowError(f"{who}: {name} width {width} is not divisible by its head count {heads}")
    mlp = _shape(sd, f"{prefix}.0.mlp.c_fc.weight", who)[0]
    return Stack(name, prefix, width, layers, heads, mlp, "clip")


def _swin_stage(sd, s: int, who: str) -> Stack:
    prefix = f"visual.trunk.layers.{s}.blocks"
    table = _shape(sd, f"{prefix}.0.attn.relative_position_bias_table", who)
    width = _shape(sd, f"{prefix}.0.norm1.weight", who)[0]
    mlp = _shape(sd, f"{prefix}.0.mlp.fc1.weight", who)[0]
    return Stack(f"visual.stage{s}", prefix, width, _layers(sd, prefix), table[1], mlp, "swin")


# --- preconditions -------------------------------------------------------------------------------


def check_growable(t: ModelSpec, s: ModelSpec, *, interpolate_pos: bool) -> None:
    """Raise :class:`GrowError` naming every size that stops ``t`` from growing into ``s``."""
    if t.vision_kind != s.vision_kind:
        raise GrowError(
            f"vision towers differ: the teacher is a {t.vision_kind.upper()}, "
            f"the student a {s.vision_kind.upper()}; "
            "inverse weight initialization grows within one kind of tower (ViT into ViT, Swin into Swin)"
        )
    if t.patch_size != s.patch_size:
        raise GrowError(
            f"patch sizes differ: teacher {t.patch_size}, student {s.patch_size} (patch-embedding kernel); "
            "grow between members with the same patch size"
        )
    if t.image_size != s.image_size and not interpolate_pos:
        raise GrowError(
            f"image sizes differ: teacher {t.image_size} px, student {s.image_size} px "
            f"(visual.positional_embedding grid {t.grid} vs {s.grid}); pass interpolate_pos=True "
            "(CLI: --interpolate-pos) to resample the teacher's positional-embedding grid"
        )
    for what, a, b in (
        ("context length", t.context_length, s.context_length),
        ("vocabulary size", t.vocab_size, s.vocab_size),
    ):
        if a != b:
            raise GrowError(
                f"text {what}s differ: teacher {a}, student {b} "
                "(positional_embedding / token_embedding rows); "
                "grow between members with the same tokenizer and context length"
            )
    if t.vision_kind == "swin" and (len(t.vision) != len(s.vision) or t.window != s.window):
        raise GrowError(
            f"Swin layouts differ: teacher {len(t.vision)} stages, window table {t.window} rows; student "
            f"{len(s.vision)} stages, {s.window} rows; grow between Swins with the same stages and window"
        )
    small = (
        [f"embed_dim {s.embed_dim} < {t.embed_dim} (text_projection)"] if s.embed_dim < t.embed_dim else []
    )
    for ts, ss in zip((*t.vision, t.text), (*s.vision, s.text), strict=True):
        for what in ("width", "layers", "heads", "head_width", "mlp"):
            a, b = getattr(ts, what), getattr(ss, what)
            if b < a:
                small.append(f"{ss.name} {what} {b} < {a} ({ss.prefix}.*)")
    if small:
        raise GrowError(
            "the student is smaller than its teacher: "
            + "; ".join(small)
            + ". A chain grows from small to large: pass the smaller model as the teacher"
        )


# --- which axis is which space --------------------------------------------------------------------


def _residual(t: Stack, s: Stack) -> Space:
    return Space(f"{s.name}.width", t.width, s.width, normed=True)


def _block_axes(t: Stack, s: Stack, layer: int) -> dict[str, tuple[Axis, ...]]:
    """Axes of every tensor of student block ``layer`` (open_clip ResidualAttentionBlock or timm Swin)."""
    r = Axis(_residual(t, s))
    r_in = Axis(r.space, "in")
    heads = Space(f"{s.name}.{layer}.heads", t.heads, s.heads, t.head_width, s.head_width)
    mlp = Space(f"{s.name}.{layer}.mlp", t.mlp, s.mlp)
    qkv, h_in = Axis(heads, groups=3), Axis(heads, "in")
    m, m_in = Axis(mlp), Axis(mlp, "in")
    if s.kind == "clip":
        return {
            "ln_1.weight": (r,),
            "ln_1.bias": (r,),
            "ln_2.weight": (r,),
            "ln_2.bias": (r,),
            "attn.in_proj_weight": (qkv, r_in),
            "attn.in_proj_bias": (qkv,),
            "attn.out_proj.weight": (r, h_in),
            "attn.out_proj.bias": (r,),
            "mlp.c_fc.weight": (m, r_in),
            "mlp.c_fc.bias": (m,),
            "mlp.c_proj.weight": (r, m_in),
            "mlp.c_proj.bias": (r,),
            "ls_1.gamma": (r,),
            "ls_2.gamma": (r,),
        }
    return {
        "norm1.weight": (r,),
        "norm1.bias": (r,),
        "norm2.weight": (r,),
        "norm2.bias": (r,),
        # (2w-1)^2 relative offsets x one column per head
        "attn.relative_position_bias_table": (FIXED, Axis(heads, with_dims=False)),
        "attn.qkv.weight": (qkv, r_in),
        "attn.qkv.bias": (qkv,),
        "attn.proj.weight": (r, h_in),
        "attn.proj.bias": (r,),
        "mlp.fc1.weight": (m, r_in),
        "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (r, m_in),
        "mlp.fc2.bias": (r,),
    }


def _tower_axes(t: ModelSpec, s: ModelSpec) -> dict[str, tuple[Axis, ...]]:
    """Axes of the tensors outside the blocks: embeddings, norms, projections, Swin's PatchMerging."""
    e = Space("embed", t.embed_dim, s.embed_dim, normed=True)  # CLIP L2-normalizes the embedding
    rt = _residual(t.text, s.text)
    axes: dict[str, tuple[Axis, ...]] = {
        "token_embedding.weight": (FIXED, Axis(rt)),
        "positional_embedding": (FIXED, Axis(rt)),
        "ln_final.weight": (Axis(rt),),
        "ln_final.bias": (Axis(rt),),
        "text_projection": (Axis(rt, "in"), Axis(e)),
        "logit_scale": (),
        "logit_bias": (),
    }
    if s.vision_kind == "vit":
        rv = Axis(_residual(t.vision[0], s.vision[0]))
        axes.update(
            {
                "visual.conv1.weight": (rv, FIXED, FIXED, FIXED),
                "visual.conv1.bias": (rv,),
                "visual.class_embedding": (rv,),
                "visual.positional_embedding": (FIXED, rv),
                "visual.ln_pre.weight": (rv,),
                "visual.ln_pre.bias": (rv,),
                "visual.ln_post.weight": (rv,),
                "visual.ln_post.bias": (rv,),
                "visual.proj": (Axis(rv.space, "in"), Axis(e)),
            }
        )
        return axes
    stages = [_residual(a, b) for a, b in zip(t.vision, s.vision, strict=True)]
    p = "visual.trunk."
    axes.update(
        {
            p + "patch_embed.proj.weight": (Axis(stages[0]), FIXED, FIXED, FIXED),
            p + "patch_embed.proj.bias": (Axis(stages[0]),),
            p + "patch_embed.norm.weight": (Axis(stages[0]),),
            p + "patch_embed.norm.bias": (Axis(stages[0]),),
            p + "norm.weight": (Axis(stages[-1]),),
            p + "norm.bias": (Axis(stages[-1]),),
            "visual.head.proj.weight": (Axis(e), Axis(stages[-1], "in")),
            "visual.head.proj.bias": (Axis(e),),
        }
    )
    for i in range(1, len(stages)):
        # PatchMerging: LayerNorm + Linear over the concat of 4 neighbours, each the previous stage's width
        merged = Axis(stages[i - 1], groups=4)
        axes[f"{p}layers.{i}.downsample.norm.weight"] = (merged,)
        axes[f"{p}layers.{i}.downsample.norm.bias"] = (merged,)
        axes[f"{p}layers.{i}.downsample.reduction.weight"] = (
            Axis(stages[i]),
            Axis(stages[i - 1], "in", groups=4),
        )
    return axes


# The tensors of a block that write its residual branch into the stream (MSG masks a new layer here).
_BRANCH_OUTPUTS = {
    "clip": ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"),
    "swin": ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"),
}


def branch_outputs(s: ModelSpec) -> dict[str, tuple[str, int]]:
    """Student tensors whose output a block adds to the residual stream -> (stack name, layer)."""
    return {
        f"{st.prefix}.{layer}.{suffix}": (st.name, layer)
        for st in (*s.vision, s.text)
        for layer in range(st.layers)
        for suffix in _BRANCH_OUTPUTS[st.kind]
    }


def plan(t: ModelSpec, s: ModelSpec, depth: DepthFn) -> tuple[dict[str, Rule], dict[str, list[int | None]]]:
    """Rules for every student tensor compt knows, and per stack the depth map (student layer ->
    teacher layer)."""
    rules = {k: Rule(k, axes) for k, axes in _tower_axes(t, s).items()}
    depth_maps: dict[str, list[int | None]] = {}
    for ts, ss in zip((*t.vision, t.text), (*s.vision, s.text), strict=True):
        depth_maps[ss.name] = layer_of = depth(ts.layers, ss.layers)
        for layer, src in enumerate(layer_of):
            for suffix, axes in _block_axes(ts, ss, layer).items():
                source = None if src is None else f"{ts.prefix}.{src}.{suffix}"
                rules[f"{ss.prefix}.{layer}.{suffix}"] = Rule(source, axes)
    return rules, depth_maps


# --- the CLIP paradigm's GrowLayout ------------------------------------------------------------------


@dataclass(frozen=True)
class ClipHints:
    """What a CLIP state dict's shapes do not tell: the tower kind, head counts, the (Swin) image size."""

    vision_kind: str
    vision_heads: int | None
    text_heads: int
    image_size: int


def _resample_pos(pos: torch.Tensor, grid_s: int) -> torch.Tensor:
    """A ViT positional embedding on a new patch grid (bicubic), class-token row kept."""
    grid_t = round((pos.shape[0] - 1) ** 0.5)
    grid = pos[1:].float().reshape(1, grid_t, grid_t, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_s, grid_s), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1].float(), grid.permute(0, 2, 3, 1).reshape(grid_s * grid_s, -1)]).to(pos.dtype)


def _preserving_notes(
    t: ModelSpec, s: ModelSpec, width: str, depth_maps: dict[str, list[int | None]]
) -> list[str]:
    """Where a function-preserving width strategy (net2net, hypercloning, msg) is not exact here.

    Copying strategies (net2net, hypercloning) need every unit of a normalized space to have the same
    number of copies and keep no new layer; MSG masks new units and new layers, so only a changed head
    width (the attention scale 1/sqrt(head width), and new q/k dims inside old heads) breaks it, or a
    Swin teacher block landing on a student block with the other window shift (odd blocks shift).
    """
    notes = []
    copies = width in ("net2net", "hypercloning")
    for ts, ss in zip((*t.vision, t.text), (*s.vision, s.text), strict=True):
        sources = depth_maps.get(ss.name, [])
        firsts = [i for i, src in enumerate(sources) if src is not None and src not in sources[:i]]
        if ss.kind == "swin" and any(i % 2 != sources[i] % 2 for i in firsts):
            notes.append(
                f"{width}: {ss.name} depth {ts.layers} -> {ss.layers} moves a teacher block onto a "
                "block with the other window shift; the function changes"
            )
        if copies and ss.width % ts.width:
            notes.append(
                f"{width}: {ss.name} width {ts.width} -> {ss.width} is not an integer ratio, so its "
                "LayerNorms see uneven copies; the function changes slightly"
            )
        if ss.head_width != ts.head_width:
            notes.append(
                f"{width}: {ss.name} head width {ts.head_width} -> {ss.head_width} changes the "
                "attention scale; the function changes"
            )
        if copies and ss.layers != ts.layers:
            notes.append(
                f"{width}: {ss.name} depth {ts.layers} -> {ss.layers}: the added layers are not "
                "identities, so the function changes"
            )
    if copies and s.embed_dim % t.embed_dim:
        notes.append(
            f"{width}: embed_dim {t.embed_dim} -> {s.embed_dim} is not an integer ratio; "
            "the cosine similarities change slightly"
        )
    return notes


class ClipLayout:
    """The :class:`~compt.grow.layout.GrowLayout` of open_clip CLIP models (ViT or Swin + text tower)."""

    def hints_from_cfg(self, cfg: Mapping[str, Any], who: str) -> ClipHints:
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        try:
            v, t = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
        except (KeyError, TypeError) as e:
            raise GrowError(f"the {who} model config is not an open_clip CLIP config ({e})") from e
        name = v.timm_model_name or ""
        kind = "vit" if not name else "swin" if "swin" in name and "swinv2" not in name else name
        size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
        return ClipHints(kind, v.width // v.head_width, t.heads, int(size))

    def hints_from_model(self, model: nn.Module, who: str) -> ClipHints:
        from open_clip.model import CLIP
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if not isinstance(model, CLIP):
            raise GrowError(f"the {who} is a {type(model).__name__}; compt.grow grows open_clip CLIP models")
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            kind, heads = "vit", visual.transformer.resblocks[0].attn.num_heads
        elif isinstance(visual, TimmModel):
            name = type(visual.trunk).__name__
            kind, heads = ("swin" if name == "SwinTransformer" else name), None
        else:
            raise GrowError(
                f"the {who}'s vision tower is a {type(visual).__name__}; compt.grow handles ViT and Swin"
            )
        return ClipHints(
            kind, heads, model.transformer.resblocks[0].attn.num_heads, int(visual.image_size[0])
        )

    def plan(
        self,
        teacher_sd: Mapping[str, torch.Tensor],
        teacher_hints: ClipHints,
        student_sd: Mapping[str, torch.Tensor],
        student_hints: ClipHints,
        *,
        depth: DepthFn,
        width: str,
        interpolate_pos: bool,
    ) -> GrowPlan:
        t = describe(teacher_sd, who="teacher", **vars(teacher_hints))
        s = describe(student_sd, who="student", **vars(student_hints))
        check_growable(t, s, interpolate_pos=interpolate_pos)
        notes = []
        if t.grid != s.grid:
            resampled = _resample_pos(teacher_sd["visual.positional_embedding"], s.grid)
            teacher_sd = {**teacher_sd, "visual.positional_embedding": resampled}
            notes.append(
                f"visual.positional_embedding resampled from a {t.grid}x{t.grid} to a "
                f"{s.grid}x{s.grid} grid (bicubic)"
            )
        rules, depth_maps = plan(t, s, depth)
        if width in ("net2net", "hypercloning", "msg"):
            notes += _preserving_notes(t, s, width, depth_maps)
        return GrowPlan(
            rules=rules,
            depth_maps=depth_maps,
            teacher_sd=teacher_sd,
            notes=notes,
            branch_outputs=branch_outputs(s),
        )


LAYOUT = ClipLayout()
