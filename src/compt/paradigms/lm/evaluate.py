"""Validation of the LM paradigm: loss and bits per byte on a fixed held-out set (issue 14, item 5).

- ``val_loss``: mean next-token cross-entropy (nats per token) over every target position of the set
  (:func:`compt.paradigms.lm.data.eval_windows`: the same windows at every call, for every seed).
- ``val_bpb``: bits per byte, ``sum(NLL) / (ln 2 * sum(bytes))`` over the targets that stand for
  text, i.e. all but ``<|endoftext|>`` (0 bytes, so it is left out of both sums, as nanochat does).
  Loss per token depends on how much text a token holds; bits per byte does not, so members with
  different tokenizers (a BPE and the byte tokenizer) compare on it.

The set is small by design (``num_windows`` x ``seq_len`` tokens, default 64 x 128): one call is a
few forward passes of a small member, cheap enough every N steps for the Fig. 1 curve.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["evaluate_lm"]


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    windows: torch.Tensor,
    token_bytes: np.ndarray | None,
    batch_size: int = 16,
) -> dict[str, float]:
    """``{"val_loss", "val_bpb", "val_tokens", "val_bytes"}`` of ``model`` on ``windows [N, T + 1]``.

    ``token_bytes`` (bytes per id, :func:`compt.paradigms.lm.tokenizer.token_bytes`) may be ``None``
    for a token source without its tokenizer: then ``val_bpb`` and ``val_bytes`` are ``nan``. The
    model's train/eval mode is restored afterwards.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or len(windows) == 0:
        raise ValueError(f"expected eval windows [N, T + 1] with N, T >= 1, got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sizes = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.float64)
    nll_sum = nll_text = num_bytes = 0.0
    try:
        for lo in range(0, len(windows), batch_size):
            batch = windows[lo : lo + batch_size].to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="none"
            ).double()
            nll_sum += nll.sum().item()
            if sizes is not None:
                b = sizes[targets.flatten().cpu()]
                nll_text += nll.cpu()[b > 0].sum().item()
                num_bytes += b.sum().item()
    finally:
        model.train(was_training)
    tokens = windows[:, 1:].numel()
    bpb = nll_text / (math.log(2) * num_bytes) if num_bytes else math.nan
    return {
        "val_loss": nll_sum / tokens,
        "val_bpb": bpb,
        "val_tokens": tokens,
        "val_bytes": num_bytes if sizes is not None else math.nan,
    }
