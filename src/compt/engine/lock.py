"""One run per folder: two ``compt chain run`` / ``compt train`` on one ``out_dir`` at once are refused.

Without it their ``metrics.jsonl`` lines interleave and one's ``final.pt`` replaces the teacher the
other already distils from (issue 11). The lock of folder ``F`` is ``flock`` on the sibling file
``F/../.F.lock``: beside the folder, not in it, so that ``--retrain`` can move the folder aside
while holding it. The kernel drops a ``flock`` when its process dies, however it dies, so a lock
is never stale; the file keeps the holder's pid, host, start time and command for the message, and
a lock taken from a holder that died without releasing it says so (its record was not cleared).
Where the filesystem has no locks (some NFS and Lustre mounts) the run warns and goes on unlocked.

Under ``torchrun`` only rank 0 takes the lock: the ranks of one job are one run, and its outcome
(taken, or the error) reaches every rank, so that no rank trains while rank 0 stops.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compt.engine import dist

__all__ = ["FolderInUseError", "FolderLock", "hold"]

_LOG = logging.getLogger("compt.lock")
# Filesystems without flock answer one of these; a taken lock answers EWOULDBLOCK instead.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderInUseError(RuntimeError):
    """Another process holds the run folder's lock; the message names it and what to do."""


class FolderLock:
    """The lock of one run folder (see the module docstring); :meth:`acquire` never waits."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).absolute()
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderInUseError` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                warnings.warn(
                    f"cannot lock {self.folder} on this filesystem ({e.strerror}); make sure no other run "
                    "uses it at the same time",
                    stacklevel=2,
                )
                return
            raise FolderInUseError(
                f"{self.folder} is in use by another run: {_describe(holder)}. Wait for it to finish, "
                "or give this run another output folder"
            ) from None
        previous = _read(fd)
        if previous:  # a holder's record is cleared on release: that process died holding the lock
            _LOG.warning("%s: taking over the lock of %s, which is gone", self.folder, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me | {"command": " ".join(sys.argv)}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clear the holder's record and drop the lock (the file stays: removing it would race)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that left no record"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
        f"(`{holder.get('command', '?')}`)"
    )


@contextmanager
def hold(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block: rank 0 takes it, every rank raises if it could not."""
    lock = FolderLock(folder)
    dist.run_on_main(lock.acquire)
    try:
        yield
    finally:
        lock.release()
