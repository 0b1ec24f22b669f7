"""One LM training step's pieces (issue 14, item 3): student forward, L_task, teacher features.

A batch is ``(tokens [B, T + 1],)`` (:class:`compt.paradigms.lm.data.TokenLoader`). The engine
(:mod:`compt.engine.train`) runs the step; this module says what distillation compares:

- ``target="feature"`` (the default, the paper's Eq. 1 carried over): the final hidden state after the
  last RMSNorm, one vector per position, the student's mapped by the projection T when the widths
  differ; the distance is :func:`compt.distill.feature_mse` (L2-normalized, as on the CLIP side);
- ``target="logit"`` (beyond the paper; Knowledge Inheritance, Qin et al. 2022): the next-token logits
  over the shared vocabulary, the distance ``T^2 KL(p_t || p_s)`` at temperature 2
  (:func:`compt.paradigms.lm.loss.logit_distance`). No projection: both models share the vocabulary.

Either distance is unweighted: :class:`compt.distill.Distiller` weighs it by alpha (fixed, scheduled or
``auto``), exactly as for CLIP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compt.paradigms.lm.loss import forward_lm

__all__ = ["TARGETS", "StudentForward", "teacher_features", "KEYS"]

TARGETS = ("feature", "logit")
KEYS = {"feature": "hidden", "logit": "logits"}  # the feature dict's key per target (logged as mse_/kl_<key>)


class StudentForward(nn.Module):
    """The student and the projection T as one module, so DDP (or FSDP2) synchronizes T's gradients."""

    def __init__(self, model: nn.Module, projection: nn.Module, target: str = "feature"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"train.distill {target!r} is not one of {', '.join(TARGETS)}")
        self.model, self.projection, self.target = model, projection, target

    def forward(self, tokens: torch.Tensor) -> dict[str, Any]:
        out = forward_lm(self.model, tokens)
        feature = self.projection(out.hidden) if self.target == "feature" else out.logits
        return {"loss": out.loss, "distill": {KEYS[self.target]: feature}}


@torch.no_grad()
def teacher_features(
    teacher: nn.Module, tokens: torch.Tensor, target: str = "feature"
) -> dict[str, torch.Tensor]:
    """The frozen teacher's final hidden state ``[B, T, d_t]`` or logits ``[B, T, V]`` of the batch."""
    out = forward_lm(teacher, tokens)
    return {KEYS[target]: out.hidden if target == "feature" else out.logits}
