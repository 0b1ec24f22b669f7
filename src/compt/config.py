"""Frozen dataclass configs: built from YAML/dicts with did-you-mean errors, overridable as ``a.b=v``.

Every config in compt is a frozen dataclass that validates itself in ``__post_init__``. This module
turns nested dicts (from YAML) into such dataclasses, reports an unknown key by name with the nearest
valid one, applies ``key.sub=value`` overrides from the command line, and turns configs back into
plain dicts for checkpoints and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "from_dict",
    "load_yaml",
    "apply_overrides",
    "to_dict",
    "parse_value",
    "override_mapping",
    "read_mapping",
    "yaml_load",
]

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.2) rather than a string (YAML 1.1).

    Typed fields were coerced anyway, but untyped ones (a chain spec's ``train``/``link`` mappings)
    kept the string, and ``summary.json`` recorded ``"lr": "1e-2"`` (issue 11's sweep).
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load``, with exponent floats such as ``1e-3`` read as numbers."""
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key, the source and the fix."""


def _hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError` naming them.

    ``where`` prefixes every message (a file name, a YAML path) so the user knows what to edit.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_hint(key, sorted(fields))}")
        kwargs[key] = _coerce(value, _field_type(cls, key), f"{where}.{key}")
    required = [name for name, f in fields.items() if _is_required(f) and name not in kwargs]
    if required:  # named as keys to add, not as Python's "__init__() missing arguments" (issue 11)
        keys = ", ".join(repr(k) for k in required)
        raise ConfigError(f"{where}: missing required key(s) {keys}; add them")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrong type reached __post_init__
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file, then apply ``key=value`` overrides (dotted keys for nesting)."""
    data = read_mapping(cls, path)
    data = override_mapping(data, overrides or [], str(path))
    return from_dict(cls, data, where=str(path))


def read_mapping(cls: type, path: str | Path, allow_empty: bool = False) -> dict[str, Any]:
    """The top-level mapping of ``cls`` fields in the YAML file ``path`` (``{}`` for an empty file when
    ``allow_empty``: a command line whose flags supply the rest)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None and allow_empty:
        return {}
    if data is None:
        required = [f.name for f in dataclasses.fields(cls) if f.init and _is_required(f)]
        raise ConfigError(
            f"{path} is empty; a {cls.__name__} needs at least {', '.join(required) or 'one key'} "
            "(see configs/demo.yaml)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of {cls.__name__} keys (key: value lines) at the top level, "
            f"got a {type(data).__name__}"
        )
    return data


def parse_value(text: str) -> Any:
    """A CLI override's value, typed the way YAML would type it (``3`` -> int, ``a,b`` stays a str)."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def override_mapping(data: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """A copy of the plain mapping ``data`` with ``key.sub=value`` overrides applied (``--set``)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nested fields)")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            value = node.get(part)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"override {item!r} ({where}): {'.'.join(parts[: i + 1])} is {value!r}, not a mapping, "
                    f"so it has no key {parts[i + 1]!r}; set {'.'.join(parts[: i + 1])}=VALUE instead"
                )
            node[part] = dict(value or {})
            node = node[part]
        node[parts[-1]] = parse_value(text)
    return data


def apply_overrides(cfg: T, overrides: list[str], where: str = "override") -> T:
    """A copy of dataclass ``cfg`` with ``key.sub=value`` overrides applied and re-validated."""
    return from_dict(type(cfg), override_mapping(to_dict(cfg), overrides, where), where=where)


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-safe) dict of a dataclass config, tuples turned into lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg
