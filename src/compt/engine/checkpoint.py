"""Checkpoints that survive crashes: atomic writes, a checksum, and a fall-back to the last good file.

A checkpoint is one ``torch.save`` payload (a dict). compt always stores at least:

- ``model``: the model's state dict (plain, never DDP/compile-prefixed),
- ``model_cfg``: the paradigm's model config (open_clip's for CLIP), so a checkpoint alone rebuilds
  its model,
- ``member``: the member's name, and ``paradigm`` its paradigm (absent in checkpoints older than
  paradigms: CLIP).

The training engine adds optimizer, scheduler, scaler, RNG states, data position and cost counters.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact. A SHA-256 of the payload bytes is stored in a
sidecar ``<file>.sha256``; a truncated or corrupted file is detected on load.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "check_writable",
    "final_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "checkpoint_digest",
    "latest_checkpoint",
    "resolve_checkpoint",
    "model_from_checkpoint",
    "prune_checkpoints",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or of another model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically with a SHA-256 sidecar; raise a clear error on failure.

    On any failure (disk full, permission) the previous file at ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        sidecar = path.with_name(path.name + ".sha256")
        old = _digests(sidecar) if path.is_file() else []
        # Three atomic steps so that a crash between any two leaves a file that verifies: the
        # sidecar first lists both sums, then the data is replaced, then only the new sum is kept.
        _atomic_write(sidecar, "".join(f"{d}  {path.name}\n" for d in [digest, *old]).encode())
        _atomic_write(path, data)
        if old:
            _atomic_write(sidecar, f"{digest}  {path.name}\n".encode())
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e}. The previous checkpoint is intact; "
            "free disk space or fix the folder's permissions, then rerun the same command (a training run "
            "resumes from its newest checkpoint)."
        ) from e
    return path


def check_writable(folder: str | Path, field: str = "out_dir") -> None:
    """Raise :class:`CheckpointError` now if ``folder`` cannot be created or written (leaves nothing behind).

    Called before training so that a bad output folder fails in the first second, not at the first
    save. The nearest existing ancestor is probed with a real temporary file: permission bits say
    nothing for root, a read-only mount or a virtual filesystem such as /proc (issue 11).
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".compt-write-test-", dir=existing)
        except OSError as e:
            problem = f"{existing} does not accept new files ({e.strerror or e})"
        else:
            os.close(fd)
            os.unlink(probe)
            return
    raise CheckpointError(
        f"{field} {folder} cannot be written: {problem}; choose another {field} or fix the path"
    )


def final_checkpoint(path: str | Path, flag: str) -> Path:
    """``path`` itself, or the ``final.pt`` of the run folder ``path`` (a teacher must have finished).

    ``flag`` names the option in the message (``--teacher``); raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "final.pt").is_file():
        raise CheckpointError(
            f"{flag} {path} is a folder without final.pt: its run has not finished; finish it first "
            "(a teacher must be a trained member), or pass a checkpoint file"
        )
    return path / "final.pt"


def verify_checkpoint(path: str | Path) -> bool:
    """True when ``path`` exists and matches its SHA-256 sidecar (files without a sidecar pass)."""
    path = Path(path)
    if not path.is_file():
        return False
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return True
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() in _digests(sidecar)


def checkpoint_digest(path: str | Path) -> str | None:
    """The SHA-256 that ``path``'s sidecar records for it (``None`` without a sidecar); reads no data."""
    digests = _digests(Path(path).with_name(Path(path).name + ".sha256"))
    return digests[0] if digests else None


def _digests(sidecar: Path) -> list[str]:
    try:
        return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any torch-saved dict with ``model``).

    ``mmap``: map the tensors from the file instead of reading them, so that reading only the config
    and counters of a large checkpoint is cheap. Raises :class:`CheckpointError` naming the file
    when it is missing or fails its checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (or train that member first)"
        )
    if not verify_checkpoint(path):
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated (SHA-256 mismatch); rerun the run that wrote it "
            "to rewrite it (it resumes from its newest valid step_*.pt), or restore it from a backup"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # torch raises several types for a damaged zip
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({e.__class__.__name__}: {e}); pass a .pt file written by "
            "compt (a run's final.pt or step_<N>.pt)"
        ) from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(
            f"{path} is not a compt checkpoint (no 'model' entry); pass a run's final.pt or step_<N>.pt"
        )
    return payload


_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``step_*.pt`` in ``folder`` that passes its checksum, warning about each bad one."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_RE.search(p.name)))
    for _, p in reversed(found):
        if verify_checkpoint(p):
            return p
        warnings.warn(
            f"checkpoint {p} is corrupted or truncated; falling back to an earlier one", stacklevel=2
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of ``path``: itself, or a run folder's ``final.pt`` (else its newest valid
    ``step_*.pt``); ``FileNotFoundError`` naming the path when there is none."""
    path = Path(path)
    if path.is_dir():
        found = path / "final.pt" if (path / "final.pt").is_file() else latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no final.pt or step_*.pt; pass a checkpoint file or a run folder"
            )
        return found
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint file, a run folder or an export")
    return path


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``step_*.pt`` checkpoints (and their sidecars).

    Also deletes temporary files that a process killed mid-write left behind (a checkpoint's worth
    of disk each); this process's own are in use and kept.
    """
    for tmp in Path(folder).glob(".step_*.pt*.tmp*"):
        if not tmp.name.endswith(f".tmp{os.getpid()}"):
            tmp.unlink(missing_ok=True)
    if keep <= 0:
        return
    found = sorted(
        (int(m.group(1)), p) for p in Path(folder).glob("step_*.pt") if (m := _STEP_RE.search(p.name))
    )
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".sha256").unlink(missing_ok=True)


def model_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model stored in a checkpoint (its paradigm's, e.g. an open_clip ``CLIP``).

    Returns ``(model, payload)``. A checkpoint written before paradigms existed has no ``paradigm``
    entry and is read as CLIP (:data:`compt.paradigms.DEFAULT_PARADIGM`).
    """
    from compt.paradigms import get_paradigm

    payload = load_checkpoint(path, map_location)
    if "model_cfg" not in payload:
        raise CheckpointError(f"{path} holds no 'model_cfg'; it was not written by compt")
    try:
        paradigm = get_paradigm(payload.get("paradigm"))
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    try:  # a config of another kind of model fails here by name, not as a TypeError inside build
        paradigm.validate_model_cfg(payload["model_cfg"], "model_cfg")
    except ValueError as e:
        raise CheckpointError(
            f"{path} does not hold a {paradigm.name} model: {e}; pass a checkpoint compt wrote for one"
        ) from None
    model = paradigm.build(payload["model_cfg"])
    how = "it was not saved by compt for this model; pass the checkpoint its run wrote (final.pt)"
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CheckpointError(
            f"{path}: weights do not match its model config ({first.strip()}); {how}"
        ) from e
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match its model config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); {how}"
        )
    return model, payload
