"""FSDP2, the engine's second way to run several processes (``train.parallel=fsdp2``; issue 14, item 7).

DDP keeps a full replica of the student on every rank; a member that outgrows one device's memory is
sharded instead: ``torch.distributed.fsdp.fully_shard`` on every block the paradigm names
(:meth:`compt.paradigms.Paradigm.shard_units`: CLIP's residual blocks, an LM's decoder layers), then
on the student's forward module (the root: embeddings, final norms, heads and the projection T of
Eq. 1). Each block's parameters are all-gathered just before it runs and freed after; gradients are
reduce-scattered (averaged over ranks, as DDP does, so the engine's loss scaling is the same). On CUDA
with bf16 a ``MixedPrecisionPolicy`` gathers and computes in bf16 and reduces in fp32. The teacher of
a link is frozen and small: it stays a plain replica on every rank.

State moves as *full* state dicts, never as shards:

- growth: rank 0 grows the student (the one full copy), the sharded student loads it with
  ``broadcast_from_rank0`` (:func:`broadcast_from_rank0`);
- checkpoints (:func:`full_states`, :func:`full_optimizer_state`): model, projection and AdamW moments
  are gathered to rank 0 and written in exactly the layout a DDP run writes (optimizer state keyed by
  parameter index), so the checksummed, atomic ``step_*.pt`` / ``final.pt`` machinery, the exact-resume
  guarantees and every reader of checkpoints stay as they are, and a run may resume under the other
  mode or another world size. Restoring (:func:`load_states`, :func:`load_optimizer_state`) hands each
  rank its shards of the full tensors. A distributed checkpoint (``torch.distributed.checkpoint``, one
  shard file per rank) would avoid rank 0 holding a full copy, which matters only beyond one host's CPU
  memory, far above the members compt trains today;
- evaluation runs on rank 0 on a plain copy built from the gathered weights (:func:`plain_copy`).

The student's forward module holds the plain model as ``.model`` and T as ``.projection``
(:meth:`compt.paradigms.Paradigm.student`), so the state of each is the root's under that prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compt.engine import dist

__all__ = [
    "shard",
    "full_states",
    "load_states",
    "broadcast_from_rank0",
    "full_optimizer_state",
    "load_optimizer_state",
    "plain_copy",
    "reduce_replicated_grads",
    "clip_grad_norm",
]

_PARTS = ("model", "projection")


def shard(
    forward: nn.Module, units: list[nn.Module], device: torch.device, amp_dtype: torch.dtype | None
) -> nn.Module:
    """``fully_shard`` each of ``units``, then ``forward`` (the root), over all ranks; in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        # Gathers and matmuls in bf16, gradients reduced in fp32 (the torchtitan / Llama recipe).
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, **kwargs)
    # fully_shard refuses 0-d parameters (CLIP's logit_scale): they stay replicated on every rank and
    # their gradients are averaged by reduce_replicated_grads, as DDP would.
    scalars = {p for p in forward.parameters() if p.dim() == 0}
    return fully_shard(forward, **kwargs, ignored_params=scalars or None)


def _replicated(params) -> list[nn.Parameter]:
    from torch.distributed.tensor import DTensor

    return [p for p in params if p.grad is not None and not isinstance(p, DTensor)]


def reduce_replicated_grads(forward: nn.Module) -> None:
    """Average over ranks the gradients of the parameters FSDP2 left replicated (after backward)."""
    for p in _replicated(forward.parameters()):
        p.grad.copy_(dist.all_reduce_mean(p.grad))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient L2 norm over sharded and replicated parameters; returns the norm.

    ``torch.nn.utils.clip_grad_norm_`` cannot mix DTensor and plain gradients: each rank sums the
    squares of its shards (all-reduced) and of the replicated gradients (the same on every rank).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    square = torch.stack([g.float().square().sum() for g in sharded]).sum()
    square = dist.all_reduce_mean(square) * dist.world_size()  # the sum over ranks
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    if replicated:
        square = square + torch.stack([g.float().square().sum() for g in replicated]).sum()
    norm = square.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_: no host sync
    for g in sharded + replicated:
        g.mul_(scale.to(g.dtype))
    return norm


def _options(**kw: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_states(forward: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": ..., "projection": ...}``: full CPU state dicts on rank 0, empty dicts elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(forward, options=_options(cpu_offload=True))  # a collective
    return {
        part: {k[len(part) + 1 :]: v for k, v in full.items() if k.startswith(part + ".")} for part in _PARTS
    }


def load_states(
    forward: nn.Module, states: dict[str, dict[str, torch.Tensor]], broadcast: bool = False
) -> None:
    """Load full ``{"model", "projection"}`` state dicts into the sharded ``forward`` (a collective).

    ``broadcast``: only rank 0's ``states`` are read and sent to the others (growth); else every rank
    passes the same full dicts (a checkpoint every rank has read).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # A fresh dict: the load swaps its entries for DTensor shards (lm-report open problem 6).
    full = {f"{part}.{k}": v for part in _PARTS for k, v in states.get(part, {}).items()}
    if broadcast and not dist.is_main():
        full = {}
    set_model_state_dict(forward, full, options=_options(broadcast_from_rank0=broadcast))


def broadcast_from_rank0(forward: nn.Module, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give every rank its shards of rank 0's full ``states`` (the grown student)."""
    load_states(forward, states, broadcast=True)


def _fqns(forward: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The root-relative name of every optimizer parameter, in the optimizer's (state_dict) order."""
    names = {id(p): n for n, p in forward.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(forward: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state on rank 0 (``{}`` elsewhere), keyed by parameter index like
    ``optimizer.state_dict()`` of an unsharded run (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(forward, optimizer, options=_options(cpu_offload=True))
    if not dist.is_main():
        return {}
    index = {name: i for i, name in enumerate(_fqns(forward, optimizer))}
    state = {index[name]: value for name, value in full["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(forward: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an index-keyed full optimizer state (every rank passes it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _fqns(forward, optimizer)
    full = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(forward, optimizer, full, options=_options())


def plain_copy(forward: nn.Module, build: Callable[[], nn.Module], device: torch.device) -> nn.Module | None:
    """An unsharded copy of the student on rank 0 (``None`` elsewhere), from the gathered weights."""
    states = full_states(forward)
    if not dist.is_main():
        return None
    model = build()
    model.load_state_dict(states["model"])
    return model.to(device)
