"""SID, AutoProg-Zero's unique stage identifier, for a ViT: a learned embedding added to the class token.

AutoProg-Zero (arXiv 2410.00350; changlin31/AutoProg-Zero, apz_models.py) tells the network which
stage of progressive fine-tuning it is in: ``nn.Embedding(num_stages + 1, hidden)`` initialized
N(0, 0.02), whose extra row is a null id used with probability 0.1 (the classifier-free-guidance
dropout of DiT's class label), added to DiT's adaLN conditioning ``c = t + y + s``. An open_clip
ViT has no conditioning vector, so the id is added to the class token, the one token every block
attends to and the one the ViT pools (issue 16): at the input of ``ln_pre``, where the class
embedding and its position embedding are added too. Whether it helps is measured, not assumed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StageEmbedding"]


class StageEmbedding(nn.Module):
    """``num_stages`` learned stage ids plus a null id (the last row), each a ``width`` vector."""

    def __init__(self, num_stages: int, width: int, null_prob: float = 0.1):
        super().__init__()
        if num_stages < 1 or width < 1:
            raise ValueError(
                f"StageEmbedding needs num_stages >= 1 and width >= 1, got {num_stages}, {width}"
            )
        if not 0.0 <= null_prob < 1.0:
            raise ValueError(f"StageEmbedding null_prob must be in [0, 1), got {null_prob}")
        self.num_stages, self.null_prob = num_stages, null_prob
        self.table = nn.Embedding(num_stages + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)  # as apz_models.py

    @property
    def null_id(self) -> int:
        return self.num_stages

    def draw_ids(self, stage: int, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Training ids for a batch of ``stage``: each replaced by the null id with probability ``null_prob``.

        Drawn from the global torch RNG (of ``device``), which the engine seeds and checkpoints.
        """
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is outside 0..{self.num_stages - 1}")
        ids = torch.full((batch_size,), stage, dtype=torch.long, device=device)
        drop = torch.rand(batch_size, device=device) < self.null_prob
        return ids.masked_fill(drop, self.null_id)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The ``[B, width]`` embeddings of stage ids ``[B]``."""
        return self.table(ids)
