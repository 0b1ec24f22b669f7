"""Model families: ordered lists of members, smallest first (paper App. C, Table G), of any paradigm.

A family is registered by one decorated function that returns its members, smallest first::

    @register_family("my-vit")
    def my_vit() -> list[Member]:
        return [vit_member("my-S", "my-vit", width=384, ...), ...]   # compt.paradigms.clip.families

A :class:`Member` is a name and a *model config*, the dict its paradigm builds the model from
(an open_clip model config for CLIP: ``embed_dim`` + ``vision_cfg`` + ``text_cfg``); each paradigm
has its own Member subclass (:class:`compt.paradigms.clip.families.ClipMember` adds the CLIP sizes).
The built-in families (``vit``, ``swin``, ``tiny``, ``debug``, ...) register when their paradigm is
first imported, which every lookup here does for you. A family can also be a YAML file
(:func:`load_family_yaml`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from compt.config import yaml_load

if TYPE_CHECKING:
    from compt.paradigms import Paradigm

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
    """One model of a family: a name and its paradigm's model config (subclassed per paradigm)."""

    name: str
    family: str
    model_cfg: dict[str, Any]

    paradigm_name: ClassVar[str] = ""  # set by each paradigm's subclass

    @property
    def key(self) -> str:
        return normalize_name(self.name)

    @property
    def paradigm(self) -> Paradigm:
        from compt.paradigms import get_paradigm

        return get_paradigm(self.paradigm_name)

    def model_config(self) -> dict[str, Any]:
        """A deep copy of the model config, safe for callers to mutate or serialize."""
        return copy.deepcopy(self.model_cfg)

    def create(self, device: torch.device | str | None = None) -> nn.Module:
        """A freshly initialized model of this member (``device='meta'``: no memory)."""
        return self.paradigm.build(self.model_config(), device)


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

    @property
    def paradigm(self) -> Paradigm:
        return self.members[0].paradigm


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


def _builtins() -> None:
    from compt.paradigms import load_builtins

    load_builtins()


def list_families() -> list[str]:
    _builtins()
    return sorted(_REGISTRY)


def _make_family(name: str, members: tuple[Member, ...], description: str, where: str) -> Family:
    kinds = {m.paradigm_name for m in members}
    if len(kinds) != 1 or "" in kinds:
        raise ValueError(
            f"{where}: every member of a family must be of one paradigm (got {sorted(kinds)}); "
            "a chain grows within one kind of model"
        )
    for m in members:
        m.paradigm.validate_model_cfg(m.model_cfg, where=f"{where}, member {m.name!r}")
    return Family(name=name, members=members, description=description)


def get_family(name: str) -> Family:
    """The registered family ``name``, or a family loaded from a YAML file path."""
    if name in _CACHE:
        return _CACHE[name]
    _builtins()
    if name not in _REGISTRY:
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            return load_family_yaml(name)
        raise KeyError(_unknown(name, list_families(), "the family registry"))
    members = tuple(_REGISTRY[name]())
    fam = _make_family(name, members, _DESCRIPTIONS.get(name, ""), where=f"family {name!r}")
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


def create(name: str | Member, family: str | None = None, device: str | None = None) -> nn.Module:
    """A freshly initialized model of member ``name``."""
    return get_member(name, family).create(device)


def check_ascending(members: list[Member]) -> None:
    """Raise if the members are not in strictly ascending size (a chain goes small to large)."""
    from compt.cost import count_params  # cost depends on families, not the other way round

    for i, (a, b) in enumerate(zip(members, members[1:], strict=False)):
        if a.key == b.key:
            raise ValueError(
                f"member {b.name} appears twice in the chain (positions {i + 1} and {i + 2}); "
                "list each member once, smallest first"
            )
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


# --- custom families from YAML ------------------------------------------------------------------


def load_family_yaml(path: str | Path) -> Family:
    """Load a family from YAML::

        name: my-family
        paradigm: clip            # optional; clip by default
        members:
          - name: my-S
            embed_dim: 64
            vision_cfg: {image_size: 32, patch_size: 4, width: 64, layers: 2, head_width: 16}
            text_cfg: {context_length: 32, width: 64, heads: 4, layers: 2}

    Each member holds its paradigm's model-config fields; an unknown field is an error naming it and
    the file.
    """
    from compt.paradigms import get_paradigm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"family file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        doc = yaml_load(f) or {}
    if not isinstance(doc, dict) or "members" not in doc:
        raise ValueError(f"{path}: a family file needs a top-level 'members:' list")
    unknown = set(doc) - {"name", "description", "paradigm", "members"}
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level field(s) {sorted(unknown)}; "
            "allowed: name, description, paradigm, members"
        )
    fam_name = str(doc.get("name", path.stem))
    try:
        member_class = get_paradigm(doc.get("paradigm")).member_class
    except KeyError as e:
        raise ValueError(f"{path}: paradigm: {e.args[0]}") from None
    if not isinstance(doc["members"], (list, type(None))):
        raise ValueError(f"{path}: 'members' must be a list of members (one '- name: ...' entry each)")
    members = []
    for i, entry in enumerate(doc["members"] or []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: member #{i + 1} needs a 'name'")
        cfg = {k: v for k, v in entry.items() if k != "name"}
        # Names are looked up case- and '/'-insensitively, so these must differ after normalizing.
        twin = next((m.name for m in members if m.key == normalize_name(str(entry["name"]))), None)
        if twin is not None:
            raise ValueError(f"{path}: member #{i + 1} {entry['name']!r} has the same name as {twin!r}")
        members.append(member_class(name=str(entry["name"]), family=fam_name, model_cfg=cfg))
    if not members:
        raise ValueError(f"{path}: the family has no members")
    return _make_family(fam_name, tuple(members), str(doc.get("description", "")), where=str(path))
