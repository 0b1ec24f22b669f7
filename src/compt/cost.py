"""Training cost in MACs (paper App. C.2, Table G, Table 2), for members of any paradigm.

A paradigm says what one training sample is (CLIP: one image and M captions, the paper's Table G
uses M = 4) and counts its forward; App. C.2 then gives, per sample,

* forward ``C_f``, measured with ``torch.utils.flop_counter.FlopCounterMode`` (1 MAC = 2 FLOPs;
  attention included on CPU too, see :func:`count_macs`);
* backward ``C_b = 2 C_f - C_f^1`` (Eq. 6): every layer's backward costs twice its forward, except
  the first layer, whose input needs no gradient (:func:`first_layer_macs`);
* the AdamW update ``C_u = 3 x params`` per optimizer step (not per sample).

A chain link (§3.1) also runs its teacher forward on every sample. So a run of ``steps``
optimizer steps of ``batch`` samples (:func:`run_steps`: ``round(epochs x (samples // batch))``)
costs::

    steps x (batch x (student.train_macs + teacher.forward_macs) + student.update_macs)

Planning a chain before training (epoch allocation, Table 2's columns) is :mod:`compt.plan`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from compt.families import Member, get_member

__all__ = [
    "MemberCost",
    "count_macs",
    "count_params",
    "first_layer_macs",
    "numel",
    "member_cost",
    "run_macs",
    "run_steps",
    "cfg_key",
    "PAPER_BATCH_SIZE",
]

# Table C: global batch size 1024 for baseline and CoM-PT runs.
PAPER_BATCH_SIZE = 1024


# --- counting ----------------------------------------------------------------------------------


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q K^T) V: two batched matmuls (softmax and scaling are not MACs)."""
    n = math.prod(query_shape[:-2])  # batch x query heads (grouped key/value heads are broadcast)
    s_q, d_q = query_shape[-2:]
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * n * s_q * s_k * (d_q + d_v)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Backward of the two attention matmuls: each needs two matmuls of its size (App. C.2's 2x)."""
    return 2 * _sdpa_flops(query_shape, key_shape, value_shape)


# On CPU, torch dispatches scaled_dot_product_attention to a fused kernel that FlopCounterMode has
# no formula for, so attention counts as zero (measured on torch 2.14). The counter therefore runs
# under the math backend (attention becomes visible bmm ops) with nn.MultiheadAttention's fused
# fast path off; the formulas below still count the fused CPU kernel should anything call it.
_ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


@contextmanager
def _mac_counter() -> Iterator[FlopCounterMode]:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FORMULAS)
        with sdpa_kernel(SDPBackend.MATH), counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_macs(fn: Callable[[], Any]) -> int:
    """MACs of running ``fn()`` once (forward, and backward if ``fn`` calls it), attention included.

    Works on CPU and on the meta device. 1 MAC = 2 FLOPs of ``FlopCounterMode``.
    """
    with _mac_counter() as fc:
        fn()
    return fc.get_total_flops() // 2


# --- parameters ----------------------------------------------------------------------------------


def numel(module: nn.Module | nn.Parameter | torch.Tensor | None) -> int:
    """Parameters of a module (or entries of a tensor); 0 for ``None``."""
    if module is None:
        return 0
    if isinstance(module, torch.Tensor):
        return module.numel()
    return sum(p.numel() for p in module.parameters())


def cfg_key(member: Member) -> str:
    """A hashable key of ``member``'s model config (for per-config caches)."""
    return json.dumps(member.model_cfg, sort_keys=True, default=str)


def count_params(member_or_model: Member | str | nn.Module) -> dict[str, int]:
    """Parameter counts of a member (built on the meta device once, cached) or of a module.

    ``total`` always; the paradigm adds its own parts (CLIP: ``vision``, ``text``, ``text_no_embed``,
    ``total_no_embed``, ``text_blocks``).
    """
    if isinstance(member_or_model, nn.Module):
        from compt.paradigms import paradigm_of_model

        return paradigm_of_model(member_or_model).param_counts(member_or_model)
    member = get_member(member_or_model)
    return dict(_member_params(member.paradigm_name, cfg_key(member)))


@lru_cache(maxsize=256)
def _member_params(paradigm: str, key: str) -> tuple[tuple[str, int], ...]:
    from compt.paradigms import get_paradigm

    kind = get_paradigm(paradigm)
    return tuple(kind.param_counts(kind.build(json.loads(key), "meta")).items())


# --- per-member cost -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberCost:
    """Per-sample MACs of one member (App. C.2); what a sample is, is in ``sample``."""

    name: str
    params: dict[str, int]
    sample: dict[str, Any]  # the paradigm's description of one sample, e.g. {"images": 1, "captions": 4}
    forward_macs: int  # one sample
    first_layer_macs: int  # first layer of each tower (App. C.2's C_f^1), no backward to its input
    train_macs: int  # forward + backward = 3 * forward - first_layer (Eq. 5-6, no update)
    update_macs: int  # per optimizer step: AdamW, 3 x trainable params
    parts: dict[str, int] = field(default_factory=dict)  # forward MACs by part (CLIP: vision, text)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_layer_macs(tower: nn.Module, run: Callable[[], Any]) -> int:
    """MACs of the first parameterized leaf module ``run()`` calls in ``tower`` (App. C.2's layer 1)."""
    calls: list[tuple[nn.Module, tuple, dict]] = []

    def hook(module, args, kwargs):
        if not calls:
            calls.append((module, args, kwargs))

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in tower.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if not calls:
        return 0
    module, args, kwargs = calls[0]
    with torch.no_grad():
        return count_macs(lambda: module(*args, **kwargs))


def member_cost(member: Member | str, *sample_args: Any, **sample: Any) -> MemberCost:
    """Per-sample forward/training MACs and per-step update MACs of ``member`` (cached, meta device).

    ``sample`` says what one sample is, in the member's paradigm's terms: for CLIP the captions per
    image, e.g. ``member_cost("ViT-T/16", num_captions=4).forward_macs`` is one 224 px image plus 4
    captions of 77 tokens.
    """
    member = get_member(member)
    return member.paradigm.sample_cost(member, *sample_args, **sample)


def run_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a run of ``epochs`` passes (fractions allowed): rounded, at least one.

    The engine trains exactly this many (:func:`compt.engine.train.train_member`); an epoch of
    ``samples`` has ``samples // batch_size`` steps (the loader drops the last partial batch).
    """
    return max(1, round(epochs * steps_per_epoch))


def run_macs(
    student: MemberCost,
    *,
    samples: int,
    epochs: float,
    batch_size: int = PAPER_BATCH_SIZE,
    teacher: MemberCost | None = None,
) -> int:
    """Training MACs of one run: ``epochs`` passes over ``samples`` (§C.2; a link adds its teacher).

    Exactly what the engine counts: :func:`run_steps` optimizer steps, each of ``batch_size``
    samples (their training MACs and the teacher's forward) plus one AdamW update.
    """
    per_sample = student.train_macs + (teacher.forward_macs if teacher is not None else 0)
    steps = run_steps(epochs, samples // batch_size)
    return steps * (batch_size * per_sample + student.update_macs)
