"""Model families: ordered lists of CLIP members, each a real open_clip ``CLIP`` (paper App. C, Table G).

A family is registered by one decorated function that returns its members, smallest first::

    @register_family("my-vit")
    def my_vit() -> list[Member]:
        return [vit_member("my-S", width=384, ...), ...]

Members are open_clip model configs (``embed_dim`` + ``vision_cfg`` + ``text_cfg``), the same
dicts open_clip keeps in ``model_configs/*.json``, so an exported member loads with open_clip
itself. compt never adds its members to open_clip's own registry: names such as ``ViT-S-16``
mean a different text tower there, so compt resolves names in this registry only.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

__all__ = [
    "Member",
    "Family",
    "register_family",
    "list_families",
    "get_family",
    "get_member",
    "list_members",
    "create",
    "load_family_yaml",
    "check_ascending",
    "normalize_name",
]


def normalize_name(name: str) -> str:
    """The lookup key of a member name: ``ViT-S/16`` and ``vit-s-16`` are the same member."""
    return name.strip().replace("/", "-").lower()


@dataclass(frozen=True)
class Member:
    """One model of a family: a name and its open_clip model config."""

    name: str
    family: str
    model_cfg: dict[str, Any]

    @property
    def key(self) -> str:
        return normalize_name(self.name)

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
        """A deep copy of the model config, safe for callers to mutate or serialize."""
        return copy.deepcopy(self.model_cfg)

    def create(self, device: torch.device | str | None = None) -> CLIP:
        """A freshly initialized open_clip ``CLIP`` of this member (``device='meta'``: no memory)."""
        cfg = self.open_clip_config()
        with torch.device(device if device is not None else "cpu"):
            return CLIP(**cfg)


@dataclass(frozen=True)
class Family:
    """An ordered model family, smallest member first."""

    name: str
    members: tuple[Member, ...]
    description: str = ""

    def member(self, name: str) -> Member:
        key = normalize_name(name)
        for m in self.members:
            if m.key == key:
                return m
        raise KeyError(_unknown(name, [m.name for m in self.members], f"family {self.name!r}"))

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


_REGISTRY: dict[str, Callable[[], Iterable[Member]]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_CACHE: dict[str, Family] = {}


def register_family(name: str, description: str = "") -> Callable:
    """Decorator: register a function returning a family's members (smallest first) under ``name``."""

    def deco(fn: Callable[[], Iterable[Member]]) -> Callable[[], Iterable[Member]]:
        if name in _REGISTRY:
            raise ValueError(f"family {name!r} is already registered")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def list_families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> Family:
    """The registered family ``name``, or a family loaded from a YAML file path."""
    if name in _CACHE:
        return _CACHE[name]
    if name not in _REGISTRY:
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            return load_family_yaml(name)
        raise KeyError(_unknown(name, list_families(), "the family registry"))
    members = tuple(_REGISTRY[name]())
    for m in members:
        _validate_model_cfg(m.model_cfg, where=f"family {name!r}, member {m.name!r}")
    fam = Family(name=name, members=members, description=_DESCRIPTIONS.get(name, ""))
    _CACHE[name] = fam
    return fam


def list_members() -> list[Member]:
    """Every member of every registered family."""
    return [m for f in list_families() for m in get_family(f).members]


def get_member(name: str | Member, family: str | None = None) -> Member:
    """Look up a member by name (``ViT-S/16`` or ``ViT-S-16``), in ``family`` or in all families."""
    if isinstance(name, Member):
        return name
    if family is not None:
        return get_family(family).member(name)
    key = normalize_name(name)
    hits = [m for m in list_members() if m.key == key]
    if not hits:
        raise KeyError(_unknown(name, [m.name for m in list_members()], "any registered family"))
    if len(hits) > 1:
        fams = ", ".join(m.family for m in hits)
        raise KeyError(f"member {name!r} is in several families ({fams}); pass family=...")
    return hits[0]


def create(name: str | Member, family: str | None = None, device: str | None = None) -> CLIP:
    """A freshly initialized open_clip ``CLIP`` for member ``name``."""
    return get_member(name, family).create(device)


def check_ascending(members: list[Member]) -> None:
    """Raise if the members are not in strictly ascending size (a chain goes small to large)."""
    from compt.cost import count_params  # cost depends on families, not the other way round

    sizes = [count_params(m)["total"] for m in members]
    for (a, sa), (b, sb) in zip(
        zip(members, sizes, strict=False), zip(members[1:], sizes[1:], strict=False), strict=False
    ):
        if sb <= sa:
            raise ValueError(
                f"members must be in ascending size, but {b.name} ({sb / 1e6:.2f}M params) follows "
                f"{a.name} ({sa / 1e6:.2f}M params); reorder them smallest first"
            )


def _unknown(name: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown name {name!r} in {where}.{hint} Known: {', '.join(known)}"


_VISION_FIELDS = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
_TEXT_FIELDS = {f.name for f in dataclasses.fields(CLIPTextCfg)}
_MODEL_FIELDS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}


def _validate_model_cfg(cfg: dict[str, Any], where: str) -> None:
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
) -> Member:
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
    return Member(name=name, family=family, model_cfg=cfg)


def swin_member(
    name: str, family: str, *, timm_model_name: str, text_width: int, embed_dim: int = 512
) -> Member:
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
    return Member(name=name, family=family, model_cfg=cfg)


# --- the registered families -------------------------------------------------------------------


@register_family("vit", "The paper's ViT family (App. C, Table G): 224 px, patch 16, context 77.")
def _vit() -> list[Member]:
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
def _swin() -> list[Member]:
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
def _tiny() -> list[Member]:
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
def _debug() -> list[Member]:
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


# --- custom families from YAML ------------------------------------------------------------------


def load_family_yaml(path: str | Path) -> Family:
    """Load a family from YAML::

        name: my-family
        members:
          - name: my-S
            embed_dim: 64
            vision_cfg: {image_size: 32, patch_size: 4, width: 64, layers: 2, head_width: 16}
            text_cfg: {context_length: 32, width: 64, heads: 4, layers: 2}

    Each member holds open_clip model-config fields; an unknown field is an error naming it and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"family file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict) or "members" not in doc:
        raise ValueError(f"{path}: a family file needs a top-level 'members:' list")
    unknown = set(doc) - {"name", "description", "members"}
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level field(s) {sorted(unknown)}; allowed: name, description, members"
        )
    fam_name = str(doc.get("name", path.stem))
    if not isinstance(doc["members"], (list, type(None))):
        raise ValueError(f"{path}: 'members' must be a list of members (one '- name: ...' entry each)")
    members = []
    for i, entry in enumerate(doc["members"] or []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: member #{i + 1} needs a 'name'")
        cfg = {k: v for k, v in entry.items() if k != "name"}
        _validate_model_cfg(cfg, where=f"{path}: member {entry['name']!r}")
        # Names are looked up case- and '/'-insensitively, so these must differ after normalizing.
        twin = next((m.name for m in members if m.key == normalize_name(str(entry["name"]))), None)
        if twin is not None:
            raise ValueError(f"{path}: member #{i + 1} {entry['name']!r} has the same name as {twin!r}")
        members.append(Member(name=str(entry["name"]), family=fam_name, model_cfg=cfg))
    if not members:
        raise ValueError(f"{path}: the family has no members")
    return Family(name=fam_name, members=tuple(members), description=str(doc.get("description", "")))
