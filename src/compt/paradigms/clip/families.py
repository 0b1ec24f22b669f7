"""The CLIP paradigm's members and families (paper App. C, Table G): each member a real open_clip ``CLIP``.

Members are open_clip model configs (``embed_dim`` + ``vision_cfg`` + ``text_cfg``), the same dicts
open_clip keeps in ``model_configs/*.json``, so an exported member loads with open_clip itself. compt
never adds its members to open_clip's own registry: names such as ``ViT-S-16`` mean a different text
tower there, so compt resolves names in its own registry (:mod:`compt.families`) only.

Registered here: ``vit`` and ``swin`` (the paper's families), ``tiny`` (a CPU family, ~4x training
MACs a step) and ``debug`` (sub-second smoke tests).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from compt.families import Member, register_family

__all__ = ["ClipMember", "vit_member", "swin_member", "validate_model_cfg"]


@dataclass(frozen=True)
class ClipMember(Member):
    """A CLIP member: its open_clip model config and the sizes a CLIP batch is made for."""

    paradigm_name: ClassVar[str] = "clip"

    @property
    def vision_cfg(self) -> dict[str, Any]:
        return self.model_cfg["vision_cfg"]

    @property
    def text_cfg(self) -> dict[str, Any]:
        return self.model_cfg["text_cfg"]

    @property
    def image_size(self) -> int:
        return int(self.vision_cfg.get("image_size", 224))

    @property
    def context_length(self) -> int:
        return int(self.text_cfg.get("context_length", 77))

    @property
    def vision_kind(self) -> str:
        """``vit`` for open_clip's VisionTransformer, else the timm model name (e.g. a Swin)."""
        return self.vision_cfg.get("timm_model_name") or "vit"

    def open_clip_config(self) -> dict[str, Any]:
        """A deep copy of the open_clip model config (what ``open_clip_config.json`` holds)."""
        return self.model_config()


_VISION_FIELDS = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
_TEXT_FIELDS = {f.name for f in dataclasses.fields(CLIPTextCfg)}
_MODEL_FIELDS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}


def validate_model_cfg(cfg: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the field when ``cfg`` is not an open_clip CLIP config."""
    for fields, sub, label in (
        (_MODEL_FIELDS, cfg, "model"),
        (_VISION_FIELDS, cfg.get("vision_cfg", {}), "vision_cfg"),
        (_TEXT_FIELDS, cfg.get("text_cfg", {}), "text_cfg"),
    ):
        if not isinstance(sub, dict):
            raise ValueError(f"{where}: {label} must be a mapping of fields, got {sub!r}")
        for key in sub:
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}: unknown {label} field {key!r}{hint}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"{where}: missing model field {key!r}")
    # Checked here, not as an error from inside torch's attention when the model is built.
    v, t = CLIPVisionCfg(), CLIPTextCfg()
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if not vision.get("timm_model_name"):
        width, head_width = vision.get("width", v.width), vision.get("head_width", v.head_width)
        if width % head_width:
            raise ValueError(
                f"{where}: vision_cfg.width {width} is not a multiple of vision_cfg.head_width "
                f"{head_width}; choose a width that is heads x head_width"
            )
    width, heads = text.get("width", t.width), text.get("heads", t.heads)
    if width % heads:
        raise ValueError(
            f"{where}: text_cfg.width {width} is not divisible by text_cfg.heads {heads}; "
            "choose heads that divide the width"
        )


# --- builders ------------------------------------------------------------------------------------


def vit_member(
    name: str,
    family: str,
    *,
    width: int,
    layers: int,
    text_width: int,
    text_layers: int,
    embed_dim: int = 512,
    head_width: int = 64,
    mlp_ratio: float = 4.0,
    patch_size: int = 16,
    image_size: int = 224,
    context_length: int = 77,
    vocab_size: int = 49408,
) -> ClipMember:
    """A ViT/Transformer CLIP member; text heads follow the same head width as the vision tower."""
    if width % head_width or text_width % head_width:
        raise ValueError(f"{name}: widths {width}/{text_width} must be multiples of head_width {head_width}")
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": head_width,
            "mlp_ratio": mlp_ratio,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": text_width,
            "heads": text_width // head_width,
            "layers": text_layers,
            "mlp_ratio": mlp_ratio,
        },
    }
    return ClipMember(name=name, family=family, model_cfg=cfg)


def swin_member(
    name: str, family: str, *, timm_model_name: str, text_width: int, embed_dim: int = 512
) -> ClipMember:
    """A Swin CLIP member: timm Swin vision tower (random init, no pooling head) + a CLIP text tower."""
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_width // 64,
            "layers": 12,
        },
    }
    return ClipMember(name=name, family=family, model_cfg=cfg)


# --- the registered families -------------------------------------------------------------------


@register_family("vit", "The paper's ViT family (App. C, Table G): 224 px, patch 16, context 77.")
def _vit() -> list[ClipMember]:
    """The paper's ViT family (App. C, Table G)."""
    spec = [  # name, vision width, vision depth, text width
        ("ViT-T/16", 192, 12, 256),
        ("ViT-C/16", 256, 12, 320),
        ("ViT-S/16", 384, 12, 384),
        ("ViT-M/16", 512, 12, 448),
        ("ViT-B/16", 768, 12, 512),
        ("ViT-XB/16", 1024, 12, 512),
        ("ViT-L/16", 1024, 24, 768),
    ]
    return [vit_member(n, "vit", width=w, layers=d, text_width=t, text_layers=12) for n, w, d, t in spec]


@register_family("swin", "The paper's Swin family (App. C, Table G): timm Swin towers, 224 px.")
def _swin() -> list[ClipMember]:
    """The paper's Swin family (App. C, Table G)."""
    spec = [
        ("Swin-T", "swin_tiny_patch4_window7_224", 256),
        ("Swin-S", "swin_small_patch4_window7_224", 384),
        ("Swin-B", "swin_base_patch4_window7_224", 512),
        ("Swin-L", "swin_large_patch4_window7_224", 768),
    ]
    return [swin_member(n, "swin", timm_model_name=t, text_width=w) for n, t, w in spec]


@register_family(
    "tiny", "A CPU family for learning and tests: 32 px, patch 4, context 32, head width 16, ~4x MACs a step."
)
def _tiny() -> list[ClipMember]:
    """A CPU family for learning and tests (32 px images, short captions)."""
    # Each step is ~4x the training MACs of the previous one (the paper's expansion rule, §3.1.2);
    # tiny-L costs ~50x tiny-XS, and tiny-M still trains at ~100 samples/s on 2 CPU cores.
    spec = [  # name, width, layers (vision and text alike)
        ("tiny-XS", 32, 2),
        ("tiny-S", 64, 2),
        ("tiny-M", 96, 3),
        ("tiny-L", 128, 6),
    ]
    return [
        vit_member(
            n,
            "tiny",
            width=w,
            layers=d,
            text_width=w,
            text_layers=d,
            embed_dim=64,
            head_width=16,
            patch_size=4,
            image_size=32,
            context_length=32,
        )
        for n, w, d in spec
    ]


@register_family("debug", "Two sub-second members for smoke tests (16 px, context 16).")
def _debug() -> list[ClipMember]:
    """Two sub-second members for smoke tests."""
    return [
        vit_member(
            n,
            "debug",
            width=w,
            layers=d,
            text_width=w,
            text_layers=d,
            embed_dim=32,
            head_width=16,
            patch_size=4,
            image_size=16,
            context_length=16,
        )
        for n, w, d in (("debug-S", 16, 1), ("debug-L", 32, 2))
    ]
