"""``data.read_image(min_size=...)``: JPEG draft-mode decoding for the training data path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.data.images import read_image


def _photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth image with some structure (gradients and a disc), like a scan rather than noise."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    disc = ((x - 0.4) ** 2 + (y - 0.5) ** 2 < 0.05).astype(float)
    rgb = np.stack([200 * x + 40 * disc, 180 * y + 50 * disc, 120 * (x * y) + 60 * disc], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"), "RGB").convert(mode)


def _resized(im: Image.Image, n: int = 224) -> np.ndarray:
    return np.asarray(im.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float32)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_draft_decodes_smaller_but_not_below_min_size_and_looks_the_same(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"scan_{mode}.jpg"
    _photo((1000, 700), mode).save(path, quality=92)
    full = read_image(path)
    small = read_image(path, min_size=224)
    assert full.size == (1000, 700) and full.mode == "RGB"
    assert small.mode == "RGB"
    # 1000 // 224 = 4 and 700 // 224 = 3: the largest power-of-two reduction keeping both >= 224 is 1/2.
    assert small.size == (500, 350)
    # What the model sees (both resized to its input size) is the same picture.
    diff = np.abs(_resized(full) - _resized(small))
    assert diff.mean() < 2.0, diff.mean()


def test_draft_reduction_by_eight_and_small_or_non_jpeg_images_unchanged(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    _photo((2000, 1900)).save(big)
    assert read_image(big, min_size=224).size == (250, 238)  # 1/8: 250 and 238 are still >= 224
    small = tmp_path / "small.jpg"
    _photo((300, 200)).save(small)
    assert read_image(small, min_size=224).size == (300, 200)  # already below: decoded as it is
    png = tmp_path / "big.png"
    _photo((1000, 700)).save(png)
    assert np.array_equal(np.asarray(read_image(png, min_size=224)), np.asarray(read_image(png)))


@pytest.mark.parametrize("bad", [0, -5, 2.5, "224"])
def test_min_size_must_be_a_positive_int(tmp_path: Path, bad) -> None:
    path = tmp_path / "a.jpg"
    _photo((64, 64)).save(path)
    with pytest.raises(ValueError, match="min_size"):
        read_image(path, min_size=bad)
