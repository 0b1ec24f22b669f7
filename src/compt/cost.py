"""Training cost in MACs (paper App. C.2, Table G, Table 2) and epoch allocation (§3.1.2).

One training sample is one image and ``num_captions`` captions (M; the paper's Table G uses 4).
Per sample, App. C.2 counts

* forward ``C_f``: the image tower on one image plus the text tower on M captions, measured with
  ``torch.utils.flop_counter.FlopCounterMode`` (1 MAC = 2 FLOPs);
* backward ``C_b = 2 C_f - C_f^1`` (Eq. 6): every layer's backward costs twice its forward, except
  the first layer, whose input needs no gradient. The first layer is the first parameterized
  layer each tower runs: the patch-embedding conv of the image tower, and the token-embedding
  lookup of the text tower, which costs 0 MACs, so the text tower subtracts nothing;
* the AdamW update ``C_u = 3 x params`` per optimizer step (not per sample).

A chain link (§3.1) also runs its teacher forward on every sample. So a run costs::

    samples x epochs x (student.train_macs + teacher.forward_macs) + steps x student.update_macs

The contrastive logits (``B x M x embed_dim`` per sample) and the loss are left out: under 0.2% of
the smallest paper member's forward at the paper's batch size of 1024.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from compt.families import Member, check_ascending, get_member

__all__ = [
    "MemberCost",
    "PlanRow",
    "ChainPlan",
    "count_macs",
    "count_params",
    "member_cost",
    "run_macs",
    "allocate_epochs",
    "plan_chain",
    "DEFAULT_TARGET_RATIO",
    "DEFAULT_END_FRACTION",
    "PAPER_BATCH_SIZE",
]

# Table 2: ViT-T -> S -> B -> L on CC3M reaches 5.68x accumulated acceleration.
DEFAULT_TARGET_RATIO = 5.68
# App. B.1: interpolated minimum epochs 23.45 -> 12.34 along ViT-S -> L (0.53), Table D Swin 24 -> 12.
DEFAULT_END_FRACTION = 0.5
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


def _numel(module: nn.Module | nn.Parameter | torch.Tensor | None) -> int:
    if module is None:
        return 0
    if isinstance(module, torch.Tensor):
        return module.numel()
    return sum(p.numel() for p in module.parameters())


def _model_params(model: nn.Module) -> dict[str, int]:
    total = _numel(model)
    vision = _numel(getattr(model, "visual", None))
    text_root = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower in .text
    text_root = model if text_root is None else text_root
    token_embedding = _numel(getattr(text_root, "token_embedding", None))
    transformer = _numel(getattr(text_root, "transformer", None))
    # Everything but the image tower and the logit temperature/bias belongs to the text tower.
    logit = sum(_numel(getattr(model, n, None)) for n in ("logit_scale", "logit_bias"))
    text = total - vision - logit
    return {
        "total": total,
        "vision": vision,
        "text": text,
        "text_no_embed": text - token_embedding,
        "total_no_embed": total - token_embedding,
        # The paper's Table G text "Param (M)" counts the transformer blocks alone.
        "text_blocks": transformer,
    }


def _cfg_key(member: Member) -> str:
    return json.dumps(member.model_cfg, sort_keys=True, default=str)


@lru_cache(maxsize=256)
def _member_params(name: str, cfg_key: str) -> tuple[tuple[str, int], ...]:
    member = Member(name=name, family="", model_cfg=json.loads(cfg_key))
    return tuple(_model_params(member.create("meta")).items())


def count_params(member_or_model: Member | str | nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``vision``, ``text``, ``text_no_embed``, ``total_no_embed``,
    ``text_blocks``.

    ``*_no_embed`` leave out the text token-embedding table; ``text_blocks`` is the text transformer
    alone (the paper's Table G text-tower convention). A member (or member name) is built on the
    meta device once and cached; a module is counted as it is.
    """
    if isinstance(member_or_model, nn.Module):
        return _model_params(member_or_model)
    member = get_member(member_or_model)
    return dict(_member_params(member.name, _cfg_key(member)))


# --- per-member cost -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberCost:
    """Per-sample MACs of one member (App. C.2); a sample is 1 image + ``num_captions`` captions."""

    name: str
    params: dict[str, int]
    num_captions: int
    vision_macs: int  # image tower, one image
    text_macs: int  # text tower, num_captions captions
    forward_macs: int  # vision_macs + text_macs
    first_layer_macs: int  # first layer of each tower: image patch embedding + text token lookup (0 MACs)
    train_macs: int  # forward + backward = 3 * forward - first_layer (Eq. 5-6, no update)
    update_macs: int  # per optimizer step: AdamW, 3 x trainable params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_layer_macs(tower: nn.Module, run: Callable[[], Any]) -> int:
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


@lru_cache(maxsize=256)
def _member_cost(name: str, cfg_key: str, num_captions: int) -> MemberCost:
    member = Member(name=name, family="", model_cfg=json.loads(cfg_key))
    model = member.create("meta").eval()
    image = torch.empty(1, 3, member.image_size, member.image_size, device="meta")
    texts = torch.zeros(num_captions, member.context_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        vision = count_macs(lambda: model.encode_image(image))
        text = count_macs(lambda: model.encode_text(texts))
    # Layer 1 of each tower: the patch embedding (image) and the token lookup (text, 0 MACs).
    first = _first_layer_macs(model, lambda: model.encode_image(image))
    first += _first_layer_macs(model, lambda: model.encode_text(texts))
    forward = vision + text
    params = _model_params(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemberCost(
        name=name,
        params=params,
        num_captions=num_captions,
        vision_macs=vision,
        text_macs=text,
        forward_macs=forward,
        first_layer_macs=first,
        train_macs=3 * forward - first,
        update_macs=3 * trainable,
    )


def member_cost(member: Member | str, num_captions: int = 4) -> MemberCost:
    """Per-sample forward/training MACs and per-step update MACs of ``member`` (cached, meta device).

    E.g. ``member_cost("ViT-T/16").forward_macs``: one 224 px image plus 4 captions of 77 tokens.
    """
    _check_positive_int(num_captions, "num_captions (captions per image)")
    member = get_member(member)
    return _member_cost(member.name, _cfg_key(member), num_captions)


def run_macs(
    student: MemberCost,
    *,
    samples: int,
    epochs: int,
    batch_size: int = PAPER_BATCH_SIZE,
    teacher: MemberCost | None = None,
) -> int:
    """Training MACs of one run: ``epochs`` passes over ``samples`` (§C.2; a link adds its teacher).

    Optimizer steps per epoch are ``samples // batch_size`` (the loader drops the last partial batch).
    """
    per_sample = student.train_macs + (teacher.forward_macs if teacher is not None else 0)
    steps = epochs * (samples // batch_size)
    return samples * epochs * per_sample + steps * student.update_macs


# --- epoch allocation (§3.1.2) -------------------------------------------------------------------


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def allocate_epochs(
    members: Sequence[Member | str],
    baseline_epochs: int,
    target_ratio: float | None = DEFAULT_TARGET_RATIO,
    *,
    num_captions: int = 4,
    end_fraction: float = DEFAULT_END_FRACTION,
) -> list[int]:
    """Initial epochs per chain member following §3.1.2's "Training Epoch Allocation" rule.

    The first member trains for ``baseline_epochs`` (it has no teacher). The others decrease
    linearly in log(params) ("linearly as model size increases exponentially"): member i gets
    ``e * (1 - (1 - end_fraction) * log(p_i / p_2) / log(p_n / p_2))``, so the second member gets
    ``e`` and the last ``end_fraction * e``. ``e`` is solved so the chain's accumulated training MACs
    are ``1 / target_ratio`` of training every member for ``baseline_epochs`` (per-sample MACs only;
    the AdamW update is under 0.1% and ignored here). Epochs are rounded to integers in
    ``[1, baseline_epochs]``, so the achieved ratio is close to, not exactly, the target; an
    unreachable target gives 1 epoch per link. The paper then validates the first link and relaxes
    the ratio if it is not lossless; that is the chain runner's job. ``target_ratio=None`` means
    ``DEFAULT_TARGET_RATIO``.
    """
    if isinstance(members, int):
        raise TypeError(
            "allocate_epochs needs the chain's members (Member objects or names), not their count"
        )
    _check_positive_int(baseline_epochs, "baseline_epochs")
    target_ratio = DEFAULT_TARGET_RATIO if target_ratio is None else target_ratio
    if not target_ratio >= 1.0:
        raise ValueError(f"target_ratio must be >= 1 (chain cost / baseline cost <= 1), got {target_ratio!r}")
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction!r}")
    costs = [member_cost(m, num_captions) for m in members]
    if not costs:
        raise ValueError("allocate_epochs needs at least one member")
    if len(costs) == 1:
        return [baseline_epochs]
    sizes = [c.params["total"] for c in costs]
    span = math.log(sizes[-1] / sizes[1]) if len(costs) > 2 else 0.0
    position = [math.log(s / sizes[1]) / span if span > 0 else 0.0 for s in sizes[1:]]  # 0 .. 1
    weights = [1.0 - (1.0 - end_fraction) * x for x in position]
    links = [c.train_macs + t.forward_macs for t, c in zip(costs, costs[1:], strict=False)]
    baseline = baseline_epochs * sum(c.train_macs for c in costs)
    budget = baseline / target_ratio - baseline_epochs * costs[0].train_macs
    scale = max(budget, 0.0) / sum(w * link for w, link in zip(weights, links, strict=False))
    return [baseline_epochs] + [min(baseline_epochs, max(1, round(scale * w))) for w in weights]


# --- chain plan (Table 2 cost columns) -----------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    """One member of a planned chain: its per-sample cost and its baseline vs chain run MACs."""

    name: str
    params: dict[str, int]
    forward_macs: int  # per sample
    train_macs: int  # per sample, forward + backward
    epochs: int  # chain epochs
    teacher: str | None
    baseline_macs: int  # individual, baseline_epochs from scratch
    chain_macs: int  # individual, as a chain link (teacher forward included)
    baseline_accumulated_macs: int
    chain_accumulated_macs: int
    individual_acceleration: float
    accumulated_acceleration: float


@dataclass(frozen=True)
class ChainPlan:
    """Training MACs of a model family, individually (baseline) vs as a chain (paper Table 2)."""

    rows: tuple[PlanRow, ...]
    samples: int
    baseline_epochs: int
    num_captions: int
    batch_size: int
    allocated: bool  # epochs came from allocate_epochs, not from the caller
    target_ratio: float | None
    end_fraction: float | None

    @property
    def baseline_total_macs(self) -> int:
        return self.rows[-1].baseline_accumulated_macs

    @property
    def chain_total_macs(self) -> int:
        return self.rows[-1].chain_accumulated_macs

    @property
    def acceleration(self) -> float:
        return self.baseline_total_macs / self.chain_total_macs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the plan settings, one dict per member, and the totals."""
        out = {k: v for k, v in asdict(self).items() if k != "rows"}
        out["members"] = [asdict(r) for r in self.rows]
        out["baseline_total_macs"] = self.baseline_total_macs
        out["chain_total_macs"] = self.chain_total_macs
        out["acceleration"] = self.acceleration
        return out


def plan_chain(
    members: Sequence[Member | str],
    samples: int,
    baseline_epochs: int,
    epochs: Sequence[int] | None = None,
    num_captions: int = 4,
    *,
    batch_size: int = PAPER_BATCH_SIZE,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    end_fraction: float = DEFAULT_END_FRACTION,
) -> ChainPlan:
    """Cost of training ``members`` (smallest first) individually vs as a chain (Table 2 columns).

    ``samples`` are images per epoch. Without ``epochs``, they come from :func:`allocate_epochs`.
    Member i > 0 is a chain link whose teacher is member i - 1.
    """
    members = [get_member(m) for m in members]
    if not members:
        raise ValueError("a chain needs at least one member")
    _check_positive_int(samples, "samples")
    _check_positive_int(baseline_epochs, "baseline_epochs")
    _check_positive_int(batch_size, "batch_size")
    if samples < batch_size:
        raise ValueError(
            f"samples ({samples}) is smaller than batch_size ({batch_size}): no optimizer step would run; "
            "lower the batch size"
        )
    check_ascending(members)
    allocated = epochs is None
    if epochs is None:
        epochs = allocate_epochs(
            members, baseline_epochs, target_ratio, num_captions=num_captions, end_fraction=end_fraction
        )
    epochs = list(epochs)
    if len(epochs) != len(members):
        names = ", ".join(m.name for m in members)
        raise ValueError(
            f"got {len(epochs)} epoch values for {len(members)} members ({names}); give one per member"
        )
    for m, e in zip(members, epochs, strict=False):
        _check_positive_int(e, f"epochs of {m.name}")
    costs = [member_cost(m, num_captions) for m in members]
    rows, base_acc, chain_acc = [], 0, 0
    for i, (c, e) in enumerate(zip(costs, epochs, strict=False)):
        teacher = costs[i - 1] if i > 0 else None
        base = run_macs(c, samples=samples, epochs=baseline_epochs, batch_size=batch_size)
        chain = run_macs(c, samples=samples, epochs=e, batch_size=batch_size, teacher=teacher)
        base_acc, chain_acc = base_acc + base, chain_acc + chain
        rows.append(
            PlanRow(
                name=c.name,
                params=c.params,
                forward_macs=c.forward_macs,
                train_macs=c.train_macs,
                epochs=e,
                teacher=teacher.name if teacher else None,
                baseline_macs=base,
                chain_macs=chain,
                baseline_accumulated_macs=base_acc,
                chain_accumulated_macs=chain_acc,
                individual_acceleration=base / chain,
                accumulated_acceleration=base_acc / chain_acc,
            )
        )
    return ChainPlan(
        rows=tuple(rows),
        samples=samples,
        baseline_epochs=baseline_epochs,
        num_captions=num_captions,
        batch_size=batch_size,
        allocated=allocated,
        target_ratio=target_ratio if allocated else None,
        end_fraction=end_fraction if allocated else None,
    )
