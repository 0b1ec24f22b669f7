"""Image decoding and open_clip's preprocessing, with the randomness taken from a given generator.

open_clip trains with ``RandomResizedCrop(scale=(0.9, 1.0))`` + normalization by the OpenAI mean/std,
and evaluates with resize-shortest-side + center crop (``open_clip.image_transform``). torchvision's
crop draws from the *global* torch RNG, which would make a sample depend on the worker that loads
it; here the same crop is drawn from the per-sample generator the loader passes in (seeded by
seed, epoch and sample index), so a sample is the same for any number of workers or ranks.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageError",
    "open_image",
    "to_rgb",
    "train_transform",
    "eval_transform",
    "to_tensor",
    "MEAN",
    "STD",
]

MEAN = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(3, 1, 1)
# Files an image folder or a table may name (what Pillow decodes; the suffix, not the content).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})
_CROP_SCALE = (0.9, 1.0)  # open_clip AugmentationCfg default
_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default


class ImageError(Exception):
    """An image could not be read; ``reason`` is the skip-counter key (``missing_file``, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """8-bit RGB of a decoded image in any mode Pillow opens; :class:`ImageError` if it cannot be.

    Pillow's ``convert("RGB")`` is right for the 8-bit modes (1, L, LA, P, PA, RGBA, CMYK, YCbCr,
    LAB, ...; alpha is dropped, as open_clip's own preprocess does) but *clips* wider pixels to 255:
    a 16-bit PNG (mode ``I;16``) would load as pure white (issue 11). 16-bit pixels (``I;16*``, and
    ``I``, which 16-bit PGM/PPM and older Pillow's 16-bit PNGs decode to) are scaled by 255/65535;
    float pixels (``F``, float TIFFs) are taken as 0..1. Other ranges are refused, not guessed.
    """
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        arr = np.asarray(img).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(
                "unsupported_image",
                f"{where}: 32-bit integer pixels span {arr.min()}..{arr.max()}, outside the 16-bit range "
                "0..65535 that compt scales to 8 bits; convert the file to an 8- or 16-bit image",
            )
        # x / 257 is x * 255 / 65535; 257 is odd, so (x + 128) // 257 rounds to nearest, no ties.
        img = Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ImageError(
                "unsupported_image",
                f"{where}: float pixels span {arr.min():g}..{arr.max():g}; compt reads float images as "
                "0..1 (convert the file to an 8- or 16-bit image, or rescale it to 0..1)",
            )
        img = Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), mode="L")
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode Pillow decodes but cannot convert (e.g. premultiplied La)
        raise ImageError(
            "unsupported_image", f"{where}: cannot convert mode {img.mode} to RGB ({e})"
        ) from None


def open_image(source: str | Path | bytes, draft_size: int | None = None) -> Image.Image:
    """Decode an image file (path or bytes) to 8-bit RGB (:func:`to_rgb`); raise :class:`ImageError`.

    ``draft_size`` lets JPEG decoding shrink by 2/4/8 while staying at least that size, which makes
    decoding large photos several times faster without changing what the model sees much.
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise ImageError("missing_file", f"image file not found: {source}") from None
    except OSError as e:
        raise ImageError("unreadable_file", f"cannot open image {source}: {e}") from None
    where = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with fp:
            img = Image.open(fp)
            if draft_size:
                img.draft("RGB", (draft_size, draft_size))
            img.load()  # force the decode here, inside the try, so truncated data is caught
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError("corrupt_image", f"cannot decode {where}: {e}") from None
    except Image.DecompressionBombError as e:  # not an OSError: it stopped a whole run
        raise ImageError("oversized_image", f"{where}: {e}") from None
    return to_rgb(img, where)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB uint8 image -> float32 [3, H, W] normalized with open_clip's OpenAI mean/std."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy (PIL's buffer is read-only)
    t = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    return t.sub_(MEAN).div_(STD)


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (left, top, w, h), drawn as torchvision does but from ``rng``."""
    area = width * height
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback (as torchvision): the central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        w, h = width, int(round(width / _CROP_RATIO[0]))
    elif in_ratio > _CROP_RATIO[1]:
        w, h = int(round(height * _CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, image_size: int, rng: np.random.Generator) -> torch.Tensor:
    """open_clip's training transform (random resized crop, bicubic, normalize) drawn from ``rng``."""
    left, top, w, h = _crop_box(img.width, img.height, rng)
    out = img.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return to_tensor(out)


def eval_transform(img: Image.Image, image_size: int) -> torch.Tensor:
    """open_clip's eval transform: resize the shortest side (bicubic), center crop, normalize."""
    # Rounded exactly as torchvision's Resize (long side truncated) and CenterCrop (offset rounded),
    # so an exported member preprocesses pixel-for-pixel as open_clip's own transform does.
    short, long = min(img.width, img.height), max(img.width, img.height)
    long_side = int(image_size * long / short)
    w, h = (image_size, long_side) if img.width <= img.height else (long_side, image_size)
    img = img.resize((w, h), Image.BICUBIC)
    left, top = int(round((w - image_size) / 2.0)), int(round((h - image_size) / 2.0))
    return to_tensor(img.crop((left, top, left + image_size, top + image_size)))
