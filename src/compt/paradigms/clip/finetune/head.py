"""The full fine-tune's model: a CLIP image tower plus a linear head initialized zero-shot (issue 16).

Fine-tuning starts from the zero-shot classifier, as WiSE-FT and FLYP do: the head's weights are
open_clip's :func:`~open_clip.build_zero_shot_classifier` class embeddings (prompt templates averaged
per class, normalized) times the member's learned logit scale, over the tower's L2-normalized image
embedding, so before the first step the classifier's logits *are* the zero-shot logits
``100 x cos(image, class)`` and its top-1 is the zero-shot top-1. The text tower is dropped.

:class:`ImageClassifier` runs at any square resolution on the patch grid: at a lower one (the
AutoProg-Zero resolution schedule) the position embedding is resized bicubically on every forward,
the stored parameter keeps its full-resolution shape, and evaluation runs at full resolution, as
AutoProg's VOLO code does (models/volo.py:580-596). With a :class:`~.sid.StageEmbedding` the stage
id is added to the class token at the input of ``ln_pre``.

:func:`load_clip` is the one loader (any compt checkpoint, run folder or exported member) and
refuses, with a clear message, a file that does not hold a CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from torch import nn
from torch.func import functional_call

from compt.engine.checkpoint import CheckpointError
from compt.paradigms.clip.finetune.sid import StageEmbedding

# One lower-resolution path for AutoProg-One and AutoProg-Zero (issue 16): the same batch resize and
# the same bicubic position-embedding interpolation (timm's resample_abs_pos_embed).
from compt.paradigms.clip.progressive import resample_pos_embed

__all__ = [
    "ImageClassifier",
    "load_clip",
    "zero_shot_head",
    "build_classifier",
    "classification_loss",
    "top1",
]


def load_clip(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, model_cfg, info)`` of a compt checkpoint, run folder or export folder holding a CLIP.

    Raises :class:`~compt.engine.checkpoint.CheckpointError` naming the path when its model config is not an
    open_clip CLIP config (e.g. a language model's checkpoint) or the model has no image tower.
    """
    from compt.paradigms.clip.export import load_model

    how = "pass a compt CLIP checkpoint (a run's final.pt), its run folder, or an exported member folder"
    model, cfg, info = load_model(path)  # a checkpoint of another kind of model: CheckpointError
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or not hasattr(model, "encode_image"):
        raise CheckpointError(f"{path} holds a model without an image tower (no vision_cfg); {how}")
    return model, cfg, info


def _side(size: int | tuple[int, int] | None) -> int | None:
    return None if size is None else int(size[0] if isinstance(size, tuple) else size)


class ImageClassifier(nn.Module):
    """``logits = head(normalize(visual(images)))``; ``visual`` keeps open_clip's module paths."""

    def __init__(self, visual: nn.Module, head: nn.Linear, stage_embedding: StageEmbedding | None = None):
        super().__init__()
        self.visual, self.head, self.stage_embedding = visual, head, stage_embedding
        # open_clip towers keep (height, width) tuples; None when a tower does not say.
        self.image_size = _side(getattr(visual, "image_size", None))
        self.patch_size = _side(getattr(visual, "patch_size", None))
        self._stage_vec: torch.Tensor | None = None
        if stage_embedding is not None:
            if not self.is_vit:
                raise ValueError(
                    "a stage embedding (SID) needs an open_clip ViT tower (it goes on the class token)"
                )
            visual.ln_pre.register_forward_pre_hook(self._add_stage)

    @property
    def is_vit(self) -> bool:
        """True for open_clip's VisionTransformer (class token, learnable grid position embedding)."""
        return all(
            hasattr(self.visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre")
        )

    def _add_stage(self, module: nn.Module, args: tuple[torch.Tensor, ...]):
        if self._stage_vec is None:
            return None
        x = args[0]  # [B, 1 + tokens, width], the class token first
        return (torch.cat([x[:, :1] + self._stage_vec[:, None].to(x.dtype), x[:, 1:]], dim=1),)

    def _check_size(self, images: torch.Tensor) -> int:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"classifier: images must be [B, 3, S, S] (square), got {tuple(images.shape)}")
        size = int(images.shape[-1])
        if self.image_size is not None and size != self.image_size:
            if not self.is_vit:
                raise ValueError(
                    f"classifier: images are {size} px but this image tower takes {self.image_size} px "
                    "only; resize them (compt.paradigms.clip.data.images.eval_transform) to the member's size"
                )
            if size % self.patch_size or size > self.image_size:
                raise ValueError(
                    f"classifier: images are {size} px; this ViT takes multiples of its {self.patch_size} px "
                    f"patch up to {self.image_size} px"
                )
        return size

    def forward(self, images: torch.Tensor, stage_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, C]``. ``stage_ids`` ``[B]`` for SID (default: the last stage's id)."""
        size = self._check_size(images)
        if self.stage_embedding is not None:
            if stage_ids is None:  # the final weights were trained at the last stage
                stage_ids = torch.full(
                    (len(images),), self.stage_embedding.num_stages - 1, device=images.device
                )
            self._stage_vec = self.stage_embedding(stage_ids)
        try:
            if self.image_size is None or size == self.image_size:
                feats = self.visual(images)
            else:
                pos = resample_pos_embed(self.visual.positional_embedding, size // self.patch_size)
                feats = functional_call(self.visual, {"positional_embedding": pos}, (images,))
        finally:
            self._stage_vec = None
        return self.head(F.normalize(feats, dim=-1))


def zero_shot_head(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[str], tokenizer
) -> nn.Linear:
    """A ``Linear(embed_dim, C)`` equal to ``model``'s zero-shot classifier times its logit scale."""
    if len(classnames) < 2:
        raise ValueError(f"a classifier needs at least two classes, got {list(classnames)}")
    device = next(model.parameters()).device
    with torch.no_grad():
        weights = build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device)
        scale = model.logit_scale.exp().float()
        head = nn.Linear(weights.shape[0], len(classnames), device=device)
        head.weight.copy_(scale * weights.T.float())
        bias = getattr(model, "logit_bias", None)  # a SigLIP-style member adds a learned bias
        head.bias.fill_(0.0 if bias is None else float(bias))
    return head


def build_classifier(
    model: nn.Module,
    model_cfg: dict[str, Any],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    num_stages: int | None = None,
    sid_null_prob: float = 0.1,
) -> ImageClassifier:
    """The CLIP ``model``'s image tower with a zero-shot-initialized head (and SID with ``num_stages``)."""
    from compt.paradigms.clip.data import tokenizer as make_tokenizer

    context_length = int(model_cfg["text_cfg"].get("context_length", 77))
    was_training = model.training
    model.eval()
    head = zero_shot_head(model, classnames, templates, make_tokenizer(context_length))
    model.train(was_training)
    sid = None
    if num_stages is not None:
        width = model.visual.class_embedding.shape[-1] if hasattr(model.visual, "class_embedding") else 0
        sid = StageEmbedding(num_stages, width, sid_null_prob).to(head.weight.device)
    return ImageClassifier(model.visual, head, sid)


def classification_loss(
    classifier: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    stage_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross-entropy, logits)`` of a batch: the full fine-tune's task loss."""
    logits = classifier(images, stage_ids)
    return F.cross_entropy(logits, labels), logits


@torch.no_grad()
def top1(
    classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy (%) at full resolution, in eval mode (the mode is restored afterwards)."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    try:
        hits = sum(
            int(
                (
                    classifier(images[i : i + batch_size].to(device)).argmax(1).cpu()
                    == labels[i : i + batch_size]
                ).sum()
            )
            for i in range(0, len(images), batch_size)
        )
    finally:
        classifier.train(was_training)
    return 100.0 * hits / max(1, len(images))
