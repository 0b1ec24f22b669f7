"""Data-parallel plumbing: the only module that reads the ``torchrun`` environment (App. B.1: 8 GPUs, DDP).

compt runs the same code as a plain process and under ``torchrun --nproc_per_node N``. torchrun
sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; this module turns
them into a :class:`DistInfo` (rank, world size, device) and a process group (NCCL on CUDA, gloo on
CPU). Everything else in compt asks this module for rank/world size instead of reading ``os.environ``.

Helpers for the training step: :func:`gather_with_local_grad` (the CLIP loss sees the global batch,
the local slice keeps its autograd graph), :func:`all_reduce_mean`, :func:`broadcast_object`,
:func:`barrier`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "resolve_device",
    "teardown",
    "is_initialized",
    "launch_rank",
    "launch_local_rank",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "gather_with_local_grad",
    "all_reduce_mean",
    "all_reduce_max",
    "broadcast_object",
    "run_on_main",
    "all_gather_object",
]


T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0..world_size-1
    local_rank: int  # rank on this node (selects the GPU)
    world_size: int  # number of processes in the job
    device: torch.device  # the device this rank trains on
    backend: str | None  # "nccl" / "gloo", or None for a plain single process
    owns_group: bool  # True when init_distributed created the process group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} must be an integer (set by torchrun)"
        ) from None


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The device ``device`` names on this machine, checked (``auto``/None: this rank's GPU, else CPU).

    Raises ``ValueError`` saying what to use instead when the machine has no such device, so a spec
    fails when it is loaded rather than after a member trained (issue 11). Changes nothing.
    """
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:K") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: compt trains on cpu or cuda; use auto, cpu, cuda or cuda:K")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but this machine has no CUDA device (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device auto or cpu, "
                "or run on a GPU node"
            )
        count = torch.cuda.device_count()
        if dev.index is None:
            # One GPU per process: torchrun's LOCAL_RANK picks it (CUDA_VISIBLE_DEVICES may narrow the set).
            dev = torch.device("cuda", local_rank % count)
        elif dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), 0..{count - 1}")
    return dev


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun job if there is one; a plain process is rank 0 of a world of 1.

    ``device``: ``auto``/None, ``cpu``, ``cuda`` or ``cuda:K``. The backend follows the device:
    NCCL for CUDA, gloo for CPU. Calling this when a process group already exists (e.g. made by the
    caller) reuses it and leaves its teardown to the caller.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch_dist.is_available() and torch_dist.is_initialized():
        dev = _pick_device(device, local_rank)
        return DistInfo(
            torch_dist.get_rank(),
            local_rank,
            torch_dist.get_world_size(),
            dev,
            torch_dist.get_backend(),
            owns_group=False,
        )
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 0, 1, dev, None, owns_group=False)
    if not torch_dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={world} but {key} is not set; launch with torchrun (see docs/train.md)"
            )
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # binds NCCL to this GPU up front (no guessing in the first barrier)
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun --max-restarts keeps its store across restarts: a restarted rank that starts early
        # reads the failed attempt's peer addresses and hangs connecting to dead processes. Fresh keys
        # per attempt (tests/test_dist_fault.py).
        store = torch_dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
            timeout=kwargs["timeout"],
        )  # fmt: skip
        kwargs |= {
            "store": torch_dist.PrefixStore(f"compt/attempt_{restart}", store),
            "rank": _env_int("RANK", 0),
            "world_size": world,
        }
    torch_dist.init_process_group(**kwargs)
    return DistInfo(
        torch_dist.get_rank(), local_rank, torch_dist.get_world_size(), dev, backend, owns_group=True
    )


def teardown(info: DistInfo | None = None) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info is not None and info.owns_group and is_initialized():
        torch_dist.destroy_process_group()


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def launch_rank() -> int:
    """The rank torchrun assigned this process (readable before :func:`init_distributed`; 0 if none)."""
    return _env_int("RANK", 0)


def launch_local_rank() -> int:
    """This process's rank on its node as torchrun assigned it (0 if none); it picks the GPU."""
    return _env_int("LOCAL_RANK", 0)


def rank() -> int:
    """This process's global rank (0 for a plain process)."""
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the job (1 for a plain process)."""
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the rank that logs and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if world_size() > 1:
        torch_dist.barrier()


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order; only the local slice has a gradient.

    The CLIP loss needs every rank's features as negatives. Each rank computes the same global loss
    L, but its autograd graph reaches only its own slice, so summing the ranks' parameter gradients
    gives exactly dL/dtheta (no backward communication beyond DDP's). DDP *averages* instead of
    summing, which is why the training step multiplies the task loss by the world size
    (see :mod:`compt.engine.train`). Every rank must pass a tensor of the same shape.
    """
    world = world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch_dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor, no gradient); ``x`` itself on a single process."""
    if world_size() == 1:
        return x.detach()
    y = x.detach().clone()
    torch_dist.all_reduce(y, op=torch_dist.ReduceOp.SUM)
    return y / world_size()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``x`` over ranks (used to agree on "stop" flags)."""
    if world_size() == 1:
        return x.detach()
    y = x.detach().clone()
    torch_dist.all_reduce(y, op=torch_dist.ReduceOp.MAX)
    return y


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (picklable objects only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result, or its exception raised again, on every rank.

    For decisions that one process takes for the job (a folder's lock, reusing a finished run), so
    that an error stops every rank instead of leaving the others waiting in a collective.
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects only; e.g. per-rank RNG states)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out
