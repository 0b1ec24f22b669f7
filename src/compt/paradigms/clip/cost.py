"""What one CLIP training sample costs (paper App. C.2, Table G): one image and M captions.

The image tower runs on one image, the text tower on M captions (Table G uses M = 4). Layer 1 of
each tower (Eq. 6's first layer, whose input needs no gradient) is the patch embedding of the image
tower and the token lookup of the text tower, which costs 0 MACs. The contrastive logits
(``B x M x embed_dim`` per sample) and the loss are left out: under 0.2% of the smallest paper
member's forward at the paper's batch size of 1024.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from torch import nn

from compt.cost import MemberCost, cfg_key, count_macs, first_layer_macs, numel
from compt.paradigms.clip.families import ClipMember

__all__ = ["param_counts", "sample_cost"]


def param_counts(model: nn.Module) -> dict[str, int]:
    """``total``, ``vision``, ``text``, ``text_no_embed``, ``total_no_embed``, ``text_blocks``.

    ``*_no_embed`` leave out the text token-embedding table; ``text_blocks`` is the text transformer
    alone (the paper's Table G text-tower convention).
    """
    total = numel(model)
    vision = numel(getattr(model, "visual", None))
    text_root = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower in .text
    text_root = model if text_root is None else text_root
    token_embedding = numel(getattr(text_root, "token_embedding", None))
    transformer = numel(getattr(text_root, "transformer", None))
    # Everything but the image tower and the logit temperature/bias belongs to the text tower.
    logit = sum(numel(getattr(model, n, None)) for n in ("logit_scale", "logit_bias"))
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


def sample_cost(member: ClipMember, num_captions: int = 4) -> MemberCost:
    """Per-sample MACs of ``member``: one image at its size plus ``num_captions`` captions (cached)."""
    if isinstance(num_captions, bool) or not isinstance(num_captions, int) or num_captions <= 0:
        raise ValueError(
            f"num_captions (captions per image) must be a positive integer, got {num_captions!r}"
        )
    return _sample_cost(member.name, cfg_key(member), num_captions)


@lru_cache(maxsize=256)
def _sample_cost(name: str, key: str, num_captions: int) -> MemberCost:
    member = ClipMember(name=name, family="", model_cfg=json.loads(key))
    model = member.create("meta").eval()
    image = torch.empty(1, 3, member.image_size, member.image_size, device="meta")
    texts = torch.zeros(num_captions, member.context_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        vision = count_macs(lambda: model.encode_image(image))
        text = count_macs(lambda: model.encode_text(texts))
    first = first_layer_macs(model, lambda: model.encode_image(image))
    first += first_layer_macs(model, lambda: model.encode_text(texts))
    forward = vision + text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemberCost(
        name=name,
        params=param_counts(model),
        sample={"images": 1, "captions": num_captions},
        forward_macs=forward,
        first_layer_macs=first,
        train_macs=3 * forward - first,
        update_macs=3 * trainable,
        parts={"vision": vision, "text": text},
    )
