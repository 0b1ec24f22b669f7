"""compt.paradigms.clip.data.images: the eval transform equals open_clip's, pixel for pixel, on odd shapes."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from compt.paradigms.clip.data.images import eval_transform


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (64, 64), (33, 100), (101, 40)])
def test_eval_transform_matches_open_clip(size):
    w, h = size
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ref = open_clip.image_transform(32, is_train=False)(img)
    assert torch.equal(eval_transform(img, 32), ref)
