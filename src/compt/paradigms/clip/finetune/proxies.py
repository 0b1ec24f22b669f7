"""AutoProg-Zero's zero-cost proxies: NTK condition, ZiCo, and a candidate's step cost (issue 16).

Each candidate stage setting is scored on a few batches with no optimizer step (AutoProg-Zero,
arXiv 2410.00350; changlin31/AutoProg-Zero prog/helpers.py, train_apz.py):

* **NTK score** ``-cond(G G^T)`` (TE-NAS): G holds one row per sample, the gradient of the sum of
  that sample's outputs with respect to the trainable weights; a well-conditioned empirical NTK
  trains faster. The official code loops one backward per sample; here ``torch.func`` (``vmap`` of
  ``grad``) computes all rows at once. Memory: samples x trainable weights floats.
* **ZiCo** ``sum over layers of log(sum(mean_b |g| / std_b g))``: per weight, the mean absolute
  gradient of the loss over batches b over its standard deviation (elements with zero spread left
  out), summed per layer, logged, summed over layers (Li et al., ICLR 2023, as the official code).
* **step cost**: by default the exact MACs of one training step at the candidate's resolution and
  unfreezing, counted by ``compt.cost.count_macs`` on a real forward + backward (a frozen block
  still back-propagates its input gradient, but computes no weight gradient) plus the AdamW update
  (3 x trainable params), deterministic; or measured wall time with device synchronization (the
  official code times asynchronous CUDA launches).

"Weights" and "layers" are the trainable parameters named ``*weight`` with two or more dimensions:
linear, attention in-projection and convolution kernels (the official code takes Conv2d/Linear
weights for ZiCo); norms, biases and embeddings are left out. Gradients come from
``torch.autograd.grad`` / ``torch.func``, never ``.grad``, so scoring never disturbs training's
accumulated gradients (the official code calls ``zero_grad`` around each of its backwards).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from compt.cost import count_macs

__all__ = ["proxy_weights", "ntk_score", "zico_score", "train_macs", "measured_step_s"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, images, labels) -> loss


def proxy_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable weight matrices and kernels the proxies look at, by name."""
    return {
        n: p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and p.ndim >= 2
    }


def _weights_or_raise(model: nn.Module, what: str) -> dict[str, nn.Parameter]:
    weights = proxy_weights(model)
    if not weights:
        raise ValueError(f"{what}: the model has no trainable weight matrix; unfreeze something first")
    return weights


def ntk_score(model: nn.Module, inputs: torch.Tensor, **forward_kwargs: torch.Tensor) -> float:
    """``-cond(G G^T)`` of the per-sample output-sum gradients G on ``inputs`` (``-inf`` when singular).

    ``forward_kwargs`` are per-sample tensors (first dimension = batch) passed to ``model`` with each
    sample, e.g. ``stage_ids``.
    """
    weights = _weights_or_raise(model, "ntk_score")
    params = {n: p.detach() for n, p in weights.items()}

    def out_sum(p, x, kw):
        one = {k: v[None] for k, v in kw.items()}
        return functional_call(model, p, (x[None],), one).sum()

    # The fused attention kernels have no vmap rule (torch falls back to a slow per-sample loop);
    # no_grad keeps the result off the graph of the frozen-here parameters (torch.func.grad ignores it).
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        per_sample = vmap(grad(out_sum), in_dims=(None, 0, 0))(params, inputs, forward_kwargs)
    g = torch.cat([t.reshape(len(inputs), -1) for t in per_sample.values()], dim=1).double()
    eig = torch.linalg.eigvalsh(g @ g.T)  # ascending
    if not eig[0] > 0:  # fewer independent directions than samples: the NTK is singular
        return -math.inf
    return -float(eig[-1] / eig[0])


def zico_score(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn
) -> float:
    """ZiCo over ``batches`` (two or more): ``sum_layers log(sum(mean|g| / std g))`` of the loss gradients."""
    if len(batches) < 2:
        raise ValueError(f"zico_score needs at least 2 batches (a gradient spread), got {len(batches)}")
    weights = _weights_or_raise(model, "zico_score")
    grads = [torch.autograd.grad(loss_fn(model, x, y), list(weights.values())) for x, y in batches]
    score = 0.0
    for per_batch in zip(*grads, strict=True):
        g = torch.stack([t.detach().double().reshape(-1) for t in per_batch])  # [batches, elements]
        std = g.std(dim=0, correction=0)  # numpy's std, as the official code
        keep = std > 0
        total = float((g.abs().mean(dim=0)[keep] / std[keep]).sum())
        if total > 0:
            score += math.log(total)
    return score


def train_macs(model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: LossFn) -> int:
    """Exact MACs of one sample's forward + backward at its resolution, with the model's current freezing.

    ``image`` is ``[1, 3, S, S]``; the backward computes gradients of every trainable parameter.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("train_macs: nothing in the model trains")
    return count_macs(lambda: torch.autograd.grad(loss_fn(model, image, label), trainable))


def measured_step_s(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn
) -> float:
    """Median wall seconds of a forward + backward over ``batches``, synchronizing the device around each."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = trainable[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    times = []
    for x, y in batches:
        sync(device)
        start = time.perf_counter()
        torch.autograd.grad(loss_fn(model, x, y), trainable)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
