"""Export a member in the folder layout open_clip loads with ``local-dir:`` (issue "The chain end to end", 6).

An exported member is a folder holding exactly what open_clip 3.x reads::

    OUT/<member>/export/
        open_clip_config.json         {"model_cfg": {...}, "preprocess_cfg": {...}, "compt": {...}}
        open_clip_model.safetensors   the CLIP state dict (contiguous tensors, no shared storage)

so that, without compt installed::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT/<member>/export")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT/<member>/export")

rebuild the member with the same weights and therefore the same embeddings. ``model_cfg`` is the
member's open_clip config (the same dict compt builds it from); ``preprocess_cfg`` gives the eval
transform: resize to the member's image size, center crop, and the normalization compt trains with.
The tokenizer is open_clip's default one, at the context length in ``model_cfg["text_cfg"]``. The
``compt`` entry (member name, compt version) is ignored by open_clip.

An export does not replace another model's export in the same folder unless asked to
(``force=True``, ``compt export --force``; issue 11 item 7), and its files get the permissions the
umask gives any new file (safetensors alone used to create 0600 files teammates could not read).

:func:`load_model` is the one loader behind ``compt eval`` and ``compt export``: it accepts a
checkpoint file, a run folder (``final.pt`` or the newest valid ``step_*.pt``) or an export folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "default_preprocess_cfg",
    "export_member",
    "load_model",
    "load_exported",
    "is_export_dir",
]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"  # first in open_clip's preferred order for a local dir


def default_preprocess_cfg(image_size: int) -> dict[str, Any]:
    """open_clip ``PreprocessCfg`` fields for a member trained by compt at ``image_size`` pixels."""
    # compt's CLIP data normalizes with open_clip's (OpenAI CLIP) mean/std; the export must say the same.
    from open_clip.constants import OPENAI_DATASET_MEAN as IMAGE_MEAN
    from open_clip.constants import OPENAI_DATASET_STD as IMAGE_STD

    return {
        "size": int(image_size),
        "mode": "RGB",
        "mean": [float(x) for x in IMAGE_MEAN],
        "std": [float(x) for x in IMAGE_STD],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding an ``open_clip_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    # The temporary name does not end in .safetensors/.json, so open_clip never picks up a half file.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would; safetensors writes 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plain_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage: safetensors refuses shared or partial storage."""
    out, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from compt.paradigms.clip.evaluate import _unwrap as unwrap

    return unwrap(model)


def _same_weights(file: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """True when the safetensors ``file`` holds exactly ``tensors`` (read lazily, tensor by tensor)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return set(f.keys()) == tensors.keys() and all(
                torch.equal(f.get_tensor(k), tensors[k]) for k in f.keys()
            )
    except (SafetensorError, OSError):
        return False


def _check_target(out: Path, member: str | None, model_cfg: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """Refuse a target that is a file, or that holds another model's export (issue 11 items 7, 10).

    The same member with the same config and weights is the same export: writing it again is fine
    (a chain's rerun, an export repeated by hand).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"export folder {out} is a file, not a folder; give the folder to write the export to"
        )
    if not is_export_dir(out):  # nothing there, or an export killed before its config (incomplete)
        return
    try:
        there = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        there = None
    theirs = (there.get("compt") or {}) if isinstance(there, dict) else {}
    what = theirs.get("member") or "a model compt did not export"
    if not isinstance(there, dict) or theirs.get("member") != member:
        why = ""
    elif there.get("model_cfg") != model_cfg:
        why = " with another model config"
    elif not _same_weights(out / WEIGHTS_NAME, tensors):
        why = " with other weights"
    else:
        return
    raise ValueError(
        f"{out} already holds the export of {what}{why}; exporting {member or 'this model'} would replace "
        "it. Choose another folder, or pass --force (force=True) to replace it"
    )


def export_member(
    model_or_ckpt: torch.nn.Module | dict[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    model_cfg: dict[str, Any] | None = None,
    member: str | None = None,
    preprocess_cfg: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``out_dir/open_clip_config.json`` and ``out_dir/open_clip_model.safetensors``; return out_dir.

    ``model_or_ckpt`` is an open_clip ``CLIP`` (then ``model_cfg`` is required: a module does not
    carry its config), a checkpoint payload dict, or a path accepted by :func:`load_model`.
    ``preprocess_cfg`` overrides fields of :func:`default_preprocess_cfg`. A folder holding another
    model's export (another member, config or weights) is refused unless ``force``.
    """
    from safetensors.torch import save_file

    import compt

    if isinstance(model_or_ckpt, (str, Path)):
        model, cfg, info = load_model(model_or_ckpt)
        state, model_cfg, member = model.state_dict(), model_cfg or cfg, member or info["member"]
        where = str(model_or_ckpt)
    elif isinstance(model_or_ckpt, dict):
        if "model" not in model_or_ckpt or ("model_cfg" not in model_or_ckpt and model_cfg is None):
            raise ValueError(
                "export: a checkpoint payload needs 'model' (state dict) and 'model_cfg' entries"
            )
        state, model_cfg = model_or_ckpt["model"], model_cfg or model_or_ckpt["model_cfg"]
        member = member or model_or_ckpt.get("member")
        where = f"checkpoint payload of {member or 'an unnamed member'}"
    elif isinstance(model_or_ckpt, torch.nn.Module):
        if model_cfg is None:
            raise ValueError(
                "export: pass model_cfg=... with a model (an nn.Module does not carry its open_clip config); "
                "e.g. compt.families.get_member(name).model_cfg"
            )
        state, where = _unwrap(model_or_ckpt).state_dict(), "model"
    else:
        raise TypeError(
            f"export: expected a CLIP model, a checkpoint payload or a path, got {type(model_or_ckpt)}"
        )
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ValueError(
                f"export: model_cfg of {where} lacks {key!r}; it is not an open_clip model config"
            )

    image_size = int(model_cfg["vision_cfg"].get("image_size", 224))
    pp = {**default_preprocess_cfg(image_size), **(preprocess_cfg or {})}
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": pp,
        "compt": {"member": member, "version": compt.__version__},
    }
    tensors = _plain_state(state, where)
    out = Path(out_dir)
    if not force:
        _check_target(out, member, model_cfg, tensors)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"export folder {out} cannot be created ({e.strerror or e}); choose another folder"
        ) from None
    # Weights first, config last: a folder with a config is a complete export.
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` of an export folder, loaded by open_clip itself."""
    import open_clip

    name = f"local-dir:{Path(path)}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model, preprocess, open_clip.get_tokenizer(name)


def _check_weights(folder: Path, config: dict[str, Any]) -> None:
    """The export's weights must fit its config: say which tensors do not (open_clip asserts, issue 11)."""
    from open_clip.model import CLIP
    from safetensors import SafetensorError, safe_open

    file = folder / WEIGHTS_NAME
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{folder / CONFIG_NAME} has no 'model_cfg' mapping; it is not an open_clip export")
    if not file.is_file():
        return  # other weight files (open_clip_pytorch_model.bin, ...) are open_clip's to judge
    try:
        with torch.device("meta"):  # shapes only: no memory, no init
            want = {k: tuple(v.shape) for k, v in CLIP(**model_cfg).state_dict().items()}
    except (TypeError, ValueError, RuntimeError):
        return  # not a plain CLIP config (a custom text tower, ...): open_clip builds and judges it
    try:
        with safe_open(str(file), "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} cannot be read ({e}); export the member again") from None
    shape = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if shape or missing or extra:
        parts = [f"{len(shape)} tensor shapes differ (first: {shape[0]})" if shape else ""]
        parts += [f"{len(missing)} tensors missing (first: {missing[0]})" if missing else ""]
        parts += [f"{len(extra)} unexpected (first: {extra[0]})" if extra else ""]
        member = (config.get("compt") or {}).get("member")
        raise ValueError(
            f"{folder}: {WEIGHTS_NAME} does not fit {CONFIG_NAME} (member {member or '?'}, weights vs "
            f"config: {'; '.join(p for p in parts if p)}). The config belongs to another model than the "
            f"weights: export the member again (compt export CKPT {folder} --force)"
        )


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Load a member from a checkpoint file, a run folder or an export folder.

    Returns ``(model, model_cfg, info)``; ``info`` has ``member`` (name or None), ``source`` (the file
    or folder read) and ``format`` (``checkpoint`` or ``export``). Raises FileNotFoundError naming
    the path when there is nothing to load.
    """
    from compt.engine.checkpoint import latest_checkpoint, model_from_checkpoint

    path = Path(path)
    if path.is_dir() and is_export_dir(path):
        try:
            config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except ValueError as e:  # bad JSON or not UTF-8: name the file (was a bare decoder message)
            raise ValueError(
                f"{path / CONFIG_NAME} is not valid JSON ({e}); export the member again"
            ) from None
        _check_weights(path, config)
        model, _, _ = load_exported(path)
        member = (config.get("compt") or {}).get("member")
        return model, config["model_cfg"], {"member": member, "source": str(path), "format": "export"}
    if path.is_dir():
        found = path / "final.pt" if (path / "final.pt").is_file() else latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no final.pt, step_*.pt or {CONFIG_NAME}; pass a checkpoint file, a run folder "
                "or an export folder"
            )
        path = found
    elif not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a checkpoint file, a run folder or an export folder"
        )
    model, payload = model_from_checkpoint(path)
    return (
        model,
        payload["model_cfg"],
        {"member": payload.get("member"), "source": str(path), "format": "checkpoint"},
    )
