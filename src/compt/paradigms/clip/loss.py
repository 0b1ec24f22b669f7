"""The multi-caption CLIP task loss of §3.2 (Eq. 2-3), over the global batch of all ranks.

Each image ``v_i`` has ``M`` augmented captions ``t_{i,1..M}`` (the paper draws M=4 sub-captions per
step). Eq. 2 sums, over every caption ``t_{i,j}``, the InfoNCE term that picks ``v_i`` among the N
images (text-to-image); Eq. 3 averages it with the dual image-to-text term.

What is computed here (and what the official code does): one standard CLIP loss per caption
*slot* j, with the N images against the N captions ``t_{1..N,j}`` of that slot, then the mean over
the M slots::

    L_task = 1/M * sum_j  ( CE(s * V T_j^T, I) + CE(s * T_j V^T, I) ) / 2

with ``s`` the learnable logit scale (exp of ``model.logit_scale``, which the trainer clamps to
ln 100), features L2-normalized, and CE the mean cross-entropy over the N rows. The t2v half equals
Eq. 2 divided by N*M (a mean instead of a sum; the same gradient direction, a scale that does not
depend on the batch size). For the v2t half Eq. 3 only says "by duality"; the per-slot form keeps
the M captions of one image from competing with each other as negatives, so an image is matched to
its j-th caption among the N j-th captions.

N is the *global* batch: features are gathered from every rank
(:func:`compt.engine.dist.gather_with_local_grad`) so a run on 8 GPUs optimizes the same loss as one
process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compt.engine import dist

__all__ = ["clip_loss", "multi_caption_clip_loss"]


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """The symmetric CLIP InfoNCE loss of N image/text pairs (row i of each is a positive pair).

    ``image_features``/``text_features``: ``[N, D]``, already L2-normalized; ``logit_scale``: the
    multiplier ``s = 1/tau`` (a scalar tensor). Returns the mean over the two directions.
    """
    logits = logit_scale * image_features @ text_features.t()  # [N images, N texts]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def multi_caption_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_batch_size: int | None = None,
) -> torch.Tensor:
    """L_task of Eq. 2-3 with M captions per image, over the global batch (see the module docstring).

    ``image_features``: ``[B, D]``, ``text_features``: ``[B, M, D]`` (this rank's slice of the
    global batch, raw or normalized; they are normalized here in float32). In a process group,
    features of every rank are gathered and every rank returns the same global loss, whose graph
    reaches only its own features (so DDP's gradient *average* must be undone by multiplying by the
    world size; the trainer does this). ``local_batch_size`` is the nominal per-rank batch: a rank
    whose loader skipped bad samples has fewer rows, and is padded to it with masked rows so that
    every rank gathers tensors of the same shape.
    """
    if image_features.ndim != 2 or text_features.ndim != 3:
        raise ValueError(
            f"expected image features [B, D] and text features [B, M, D], got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if text_features.shape[0] != image_features.shape[0] or text_features.shape[2] != image_features.shape[1]:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and text features {tuple(text_features.shape)} "
            "disagree on batch size or embedding dim"
        )
    # Normalize in float32: under bf16 autocast the logits' softmax needs the extra mantissa.
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    valid = None
    if dist.world_size() > 1:
        b = image.shape[0]
        pad = (local_batch_size or b) - b
        if pad < 0:
            raise ValueError(f"local batch of {b} rows exceeds local_batch_size={local_batch_size}")
        valid = dist.gather_with_local_grad(F.pad(torch.ones(b, device=image.device), (0, pad))) > 0.5
        image = dist.gather_with_local_grad(F.pad(image, (0, 0, 0, pad)))
        text = dist.gather_with_local_grad(F.pad(text, (0, 0, 0, 0, 0, pad)))
    n, m = text.shape[0], text.shape[1]
    # Eq. 2-3 per caption slot j: logits[j] = s * V T_j^T, the N images against the N j-th captions.
    # One batched matmul for all slots; the mean over the M*N rows is the mean over slots of each
    # slot's mean cross-entropy.
    logits = logit_scale.float() * torch.matmul(image, text.permute(1, 2, 0))  # [M, N images, N texts]
    labels = torch.arange(n, device=logits.device).repeat(m)
    if valid is None:
        v2t = F.cross_entropy(logits.reshape(m * n, n), labels)
        t2v = F.cross_entropy(logits.transpose(1, 2).reshape(m * n, n), labels)
        return (t2v + v2t) / 2
    # Padding rows (skipped samples): a finite -1e9 (not -inf, whose all-masked rows would give NaN
    # gradients) removes them as negatives exactly (exp underflows to 0), and weight 0 removes their rows.
    pair = valid[:, None] & valid[None, :]
    logits = logits.masked_fill(~pair, -1e9)
    weight = valid.float().repeat(m)
    v2t = F.cross_entropy(logits.reshape(m * n, n), labels, reduction="none")
    t2v = F.cross_entropy(logits.transpose(1, 2).reshape(m * n, n), labels, reduction="none")
    return ((t2v + v2t) * weight).sum() / (2 * weight.sum())
