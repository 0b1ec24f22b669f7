"""One CLIP training step's pieces (paper §3.2, Eq. 1-4): student forward, L_task, teacher features.

The engine (:mod:`compt.engine.train`) runs the step; this module says what a CLIP batch
``(images [B, 3, H, W], texts [B, M, L])`` means:

- :class:`StudentForward` encodes the image and its M captions (one ``[B*M, L]`` text batch) and
  applies the IFD projection T to both embeddings inside the module the engine wraps in DDP, so
  T's gradients are synchronized too;
- :func:`task_loss` is the multi-caption contrastive loss of Eq. 2-3 over the *global* batch
  (features gathered from every rank, :mod:`compt.paradigms.clip.loss`);
- :func:`teacher_features` are the frozen teacher's image and text embeddings of the same batch,
  compared with the student's by Eq. 1 (averaged over the two modalities, as Eq. 4);
- :func:`clamp_temperature` keeps CLIP's learnable temperature at or above 1/100 after each step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compt.paradigms.clip.loss import multi_caption_clip_loss
from compt.paradigms.clip.progressive import encode_image

__all__ = ["StudentForward", "task_loss", "teacher_features", "teacher_task_loss", "clamp_temperature"]

LOGIT_SCALE_MAX = math.log(100)  # CLIP clamps the learnable temperature at 1/100


def _encode(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, m, length = texts.shape  # M captions per image are encoded as one [B*M, L] batch
    # At the model's own image size this is model.encode_image; smaller images (an AutoProg stage, for
    # the student and a link's teacher alike) run with the positional embedding interpolated.
    image = encode_image(model, images)
    text = model.encode_text(texts.reshape(b * m, length)).reshape(b, m, -1)
    return image, text


class StudentForward(nn.Module):
    """The student and the IFD projection T as one module, so DDP synchronizes T's gradients too."""

    def __init__(self, model: nn.Module, projection: nn.Module):
        super().__init__()
        self.model, self.projection = model, projection

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, Any]:
        image, text = _encode(self.model, images, texts)
        return {
            "image": image,
            "text": text,
            "logit_scale": self.model.logit_scale.exp(),
            "distill": {"image": self.projection(image), "text": self.projection(text)},
        }


def task_loss(out: dict[str, Any], local_batch_size: int) -> torch.Tensor:
    """L_task (Eq. 2-3): the same global-batch value on every rank (its graph reaches local features)."""
    return multi_caption_clip_loss(
        out["image"], out["text"], out["logit_scale"], local_batch_size=local_batch_size
    )


@torch.no_grad()
def teacher_features(
    teacher: nn.Module, images: torch.Tensor, texts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Teacher embeddings of the student's batch: ``image`` ``[B, D_t]`` and ``text`` ``[B, M, D_t]``.

    Called inside the student's autocast context so both run at the same precision.
    """
    image, text = _encode(teacher, images, texts)
    return {"image": image, "text": text}


@torch.no_grad()
def teacher_task_loss(
    teacher: dict[str, torch.Tensor], out: dict[str, Any], local_batch_size: int
) -> torch.Tensor:
    """The teacher's L_task (Eq. 2-3) on the batch, at the *student's* temperature; no gradient.

    At the same temperature the distillation gate compares only the two models' embeddings. Like the
    student's, it is the global-batch loss, so every rank takes the same gate decision.
    """
    return multi_caption_clip_loss(
        teacher["image"], teacher["text"], out["logit_scale"].detach(), local_batch_size=local_batch_size
    )


def clamp_temperature(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clamp ``logit_scale`` to [0, log 100] (temperature >= 1/100, as CLIP); returns it for the log."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return {"logit_scale": model.logit_scale.detach().exp()}
