"""CLIP images: the eval transform equals open_clip's; every decoded PIL mode becomes correct RGB."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from compt.paradigms.clip.data.images import ImageError, eval_transform, open_image


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (64, 64), (33, 100), (101, 40)])
def test_eval_transform_matches_open_clip(size):
    w, h = size
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ref = open_clip.image_transform(32, is_train=False)(img)
    assert torch.equal(eval_transform(img, 32), ref)


# --- every mode Pillow decodes, against a conversion that does not go through Pillow's convert ---

_RNG = np.random.default_rng(11)
_H, _W = 6, 5


def _u8(channels):
    return _RNG.integers(0, 256, (_H, _W, channels), dtype=np.uint8)


def _gray(a):
    return np.repeat(np.asarray(a, dtype=np.float64)[..., None], 3, axis=-1)


def _ycbcr_to_rgb(a):  # JPEG / ITU-R BT.601 full range
    y, cb, cr = (a[..., i].astype(np.float64) for i in range(3))
    rgb = [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)]
    return np.stack(rgb, axis=-1)


def _lab_to_rgb(img):  # LittleCMS through ImageCms, an independent colour engine
    from PIL import ImageCms

    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return np.asarray(ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB")))


def _palette(img):
    pal = np.array(img.getpalette(), dtype=np.float64).reshape(-1, 3)
    return pal[np.asarray(img)]


# mode -> (image in that mode, file format that keeps it, reference RGB of the decoded pixels, tolerance)
MODES = {
    "1": (lambda: Image.fromarray(_u8(1)[..., 0] > 127), "PNG", lambda a: _gray(a) * 255, 0),
    "L": (lambda: Image.fromarray(_u8(1)[..., 0]), "PNG", _gray, 0),
    "LA": (lambda: Image.fromarray(_u8(2), mode="LA"), "PNG", lambda a: _gray(a[..., 0]), 0),
    "P": (lambda: Image.fromarray(_u8(3)).quantize(16), "PNG", None, 0),
    "PA": (lambda: Image.fromarray(_u8(3)).quantize(16).convert("PA"), "TIFF", None, 0),
    "RGB": (lambda: Image.fromarray(_u8(3)), "PNG", lambda a: a, 0),
    "RGBA": (lambda: Image.fromarray(_u8(4), mode="RGBA"), "PNG", lambda a: a[..., :3], 0),
    "CMYK": (
        lambda: Image.fromarray(_u8(4), mode="CMYK"),
        "TIFF",
        lambda a: (255 - a[..., :3].astype(np.float64)) * (255 - a[..., 3:].astype(np.float64)) / 255,
        0.5,
    ),
    "YCbCr": (lambda: Image.fromarray(_u8(3), mode="YCbCr"), "TIFF", _ycbcr_to_rgb, 1),
    "LAB": (lambda: Image.fromarray(_u8(3), mode="LAB"), "TIFF", None, 0),
    "I;16": (
        lambda: Image.fromarray(_RNG.integers(0, 65536, (_H, _W), dtype=np.uint16)),
        "PNG",
        lambda a: _gray(a.astype(np.float64) / 257),
        0.5,
    ),
    "I;16B": (
        lambda: Image.fromarray(_RNG.integers(0, 65536, (_H, _W)).astype(">u2")),
        "TIFF",
        lambda a: _gray(a.astype(np.float64) / 257),
        0.5,
    ),
    "I": (  # 16-bit PPM/PGM decodes to mode I
        lambda: Image.fromarray(_RNG.integers(0, 65536, (_H, _W)).astype(np.int32)),
        "PPM",
        lambda a: _gray(a.astype(np.float64) / 257),
        0.5,
    ),
    "F": (
        lambda: Image.fromarray(_RNG.random((_H, _W), dtype=np.float32)),
        "TIFF",
        lambda a: _gray(a.astype(np.float64) * 255),
        0.5,
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_decoded_mode_converts_like_a_reference(tmp_path, mode):
    make, fmt, reference, tol = MODES[mode]
    path = tmp_path / f"x.{fmt.lower()}"
    make().save(path, fmt)
    decoded = Image.open(path)
    decoded.load()
    assert decoded.mode == mode  # the file really holds this mode
    if mode in ("P", "PA"):
        want = _palette(decoded.convert("P") if mode == "PA" else decoded)
    elif mode == "LAB":
        want = _lab_to_rgb(decoded)
    else:
        want = reference(np.asarray(decoded))
    got = np.asarray(open_image(path), dtype=np.float64)
    assert got.shape == (_H, _W, 3)
    assert np.abs(got - np.clip(np.round(want), 0, 255)).max() <= tol + 1e-9, mode


def test_a_16_bit_png_is_not_white(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb = np.asarray(open_image(tmp_path / "ramp.png"))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == round(65520 / 257) and len(np.unique(rgb)) == 64


@pytest.mark.parametrize(
    ("array", "fmt", "fragment"),
    [
        (np.full((4, 4), 70000, dtype=np.int32), "TIFF", "outside the 16-bit range"),
        (np.full((4, 4), 3.5, dtype=np.float32), "TIFF", "float pixels span 3.5..3.5"),
    ],
)
def test_pixel_ranges_compt_cannot_scale_are_a_counted_reason(tmp_path, array, fmt, fragment):
    Image.fromarray(array).save(tmp_path / "x.tif", fmt)
    with pytest.raises(ImageError, match=fragment) as e:
        open_image(tmp_path / "x.tif")
    assert e.value.reason == "unsupported_image" and "x.tif" in str(e.value)


def test_an_image_over_pillows_pixel_limit_is_a_counted_reason(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 px > 2 x limit: DecompressionBombError
    with pytest.raises(ImageError, match="big.png") as e:  # was an uncaught error ending the run
        open_image(tmp_path / "big.png")
    assert e.value.reason == "oversized_image"
