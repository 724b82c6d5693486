"""The true-colour rule (``medcap.data.inspect``) on pictures the phantom generator does not make:
grey with per-channel noise saved as JPEG at several qualities and chroma subsamplings, colour maps
on the blue-yellow axis (where the middle of the map is grey), and coloured rulers on grey. The
thresholds (24 levels, 1% of the pixels) and why they are where they are: the module docstring of
``medcap.data.inspect``."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

from medcap.data.inspect import InspectOptions, _color_fraction, inspect_image

OPTS = InspectOptions()
W, H = 640, 512  # a ROCOv2-like size: the check decodes at 1/8 (80 x 64)


def radiograph(seed: int) -> np.ndarray:
    """A grey, radiograph-like picture (H x W, uint8): smooth anatomy, round structures, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    a = 100 + 60 * np.cos(x / 70.0) * np.sin(y / 55.0) + rng.normal(0, 12, (H, W))
    for _ in range(4):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(20, 90)
        a += rng.uniform(-70, 90) * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)
    return a.clip(0, 255).astype(np.uint8)


def save_jpeg(im: Image.Image, path: Path, quality: int = 85, subsampling: int = 2) -> str:
    im.save(path, "JPEG", quality=quality, subsampling=subsampling)
    return str(path)


def colour_map(name: str) -> np.ndarray:
    """A matplotlib colour map as a 256 x 3 uint8 table."""
    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def draw_ruler(im: Image.Image, x0: int, y0: int, length: int, width: int) -> None:
    """A coloured scale ruler: yellow and black segments with red ticks (as on photographs and some
    radiographs)."""
    d = ImageDraw.Draw(im)
    for k in range(0, length, 16):
        fill = (255, 220, 0) if (k // 16) % 2 == 0 else (20, 20, 20)
        d.rectangle([x0 + k, y0, x0 + min(k + 16, length) - 1, y0 + width - 1], fill=fill)
    for k in range(0, length, 8):
        d.line([(x0 + k, y0), (x0 + k, y0 + (width - 1 if k % 40 == 0 else width // 2))], fill=(255, 0, 0))


@pytest.mark.parametrize("quality", [10, 25, 50, 75, 95])
@pytest.mark.parametrize("subsampling", [0, 2], ids=["4:4:4", "4:2:0"])
def test_noisy_grey_jpeg_is_grey_at_every_quality(tmp_path, quality, subsampling):
    """Grey whose channels differ by up to 8 levels (a colour scanner's noise) and then by the JPEG
    round trip: no pixel of the 1/8-scale decode reaches the 24-level threshold."""
    rng = np.random.default_rng(quality)
    g = radiograph(quality).astype(np.int16)
    rgb = np.stack([g + rng.integers(-8, 9, g.shape) for _ in range(3)], axis=-1).clip(0, 255)
    path = save_jpeg(Image.fromarray(rgb.astype(np.uint8), "RGB"), tmp_path / "g.jpg", quality, subsampling)
    info = inspect_image(path, OPTS)
    assert info.ok and info.mode == "RGB"
    assert info.true_color is False and info.color_fraction == 0.0


def test_the_reduced_decode_is_what_makes_grey_noise_harmless(tmp_path):
    """The same noisy grey decoded at full size has pixels whose channels differ by more than 24
    (up to 34 measured at quality 95): the 8 x 8 averaging of the 1/8-scale decode removes that."""
    rng = np.random.default_rng(0)
    g = radiograph(0).astype(np.int16)
    rgb = np.stack([g + rng.integers(-8, 9, g.shape) for _ in range(3)], axis=-1).clip(0, 255)
    path = save_jpeg(Image.fromarray(rgb.astype(np.uint8), "RGB"), tmp_path / "g.jpg", 95, 0)
    with Image.open(path) as full:
        assert _color_fraction(full.convert("RGB"), OPTS.color_threshold) > 0
    assert inspect_image(path, OPTS).color_fraction == 0.0


@pytest.mark.parametrize("quality", [30, 75, 95])
@pytest.mark.parametrize("cmap", ["cividis", "blue-yellow"])
def test_blue_yellow_colour_maps_are_colour(tmp_path, cmap, quality):
    """A picture rendered in a blue-yellow map is colour, although the middle of such a map is grey
    (cividis' mid-tones differ by less than the threshold; the linear blue-to-yellow map (v, v, 255 - v)
    has R = G everywhere, so only the blue-yellow difference can show it)."""
    if cmap == "cividis":
        table = colour_map("cividis")
    else:
        v = np.arange(256, dtype=np.uint8)
        table = np.stack([v, v, 255 - v], axis=-1)
    path = save_jpeg(Image.fromarray(table[radiograph(1)], "RGB"), tmp_path / "map.jpg", quality)
    info = inspect_image(path, OPTS)
    assert info.true_color is True
    assert 0.2 < info.color_fraction < 1.0  # the grey middle of the map is not counted


def test_blue_yellow_overlay_on_grey_is_colour_and_a_speck_is_not(tmp_path):
    """A functional-MRI-like overlay (blue for negative, yellow for positive activation) on a grey
    slice: three blobs (2% of the picture coloured at 1/8 scale) make it colour; one small blob
    (0.2%) is a mark."""
    grey = radiograph(2)

    def overlay(blobs: list[tuple[int, int, int, tuple[int, int, int]]]) -> Image.Image:
        im = Image.fromarray(grey, "L").convert("RGB")
        d = ImageDraw.Draw(im)
        for cx, cy, r, colour in blobs:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        return im

    yellow, blue = (250, 230, 40), (40, 90, 250)
    wide = overlay([(200, 180, 26, yellow), (420, 260, 24, blue), (320, 380, 20, yellow)])
    info = inspect_image(save_jpeg(wide, tmp_path / "wide.jpg"), OPTS)
    assert info.true_color is True and 0.015 < info.color_fraction < 0.05
    speck = overlay([(300, 250, 10, yellow)])
    info = inspect_image(save_jpeg(speck, tmp_path / "speck.jpg"), OPTS)
    assert info.true_color is False and 0 < info.color_fraction < OPTS.color_fraction


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_coloured_scale_ruler_on_grey_is_a_mark(tmp_path, quality):
    """A coloured ruler of 30% of the width, 10 px high (0.6% of the picture; 0.7-0.8% coloured at
    1/8 scale, where its edges blur) leaves a grey radiograph grey, with colour marks."""
    im = Image.fromarray(radiograph(3), "L").convert("RGB")
    draw_ruler(im, 20, H - 30, int(0.3 * W), 10)
    info = inspect_image(save_jpeg(im, tmp_path / "ruler.jpg", quality), OPTS)
    assert info.true_color is False and 0.005 < info.color_fraction < OPTS.color_fraction


def test_colour_policy_limits_are_as_documented(tmp_path):
    """What the rule cannot tell, as the docstring of medcap.data.inspect says: it measures how much
    of the picture is coloured, not the shape or the hue. A ruler along the whole bottom edge (2.3%
    of the picture drawn, 1.7% coloured at 1/8 scale) makes a grey radiograph count as colour, and so
    does a grey picture tinted in matplotlib's "bone" map (its channels differ by up to 32 levels)."""
    im = Image.fromarray(radiograph(4), "L").convert("RGB")
    draw_ruler(im, 0, H - 14, W, 12)
    assert inspect_image(save_jpeg(im, tmp_path / "edge.jpg"), OPTS).true_color is True
    bone = Image.fromarray(colour_map("bone")[radiograph(4)], "RGB")
    assert inspect_image(save_jpeg(bone, tmp_path / "bone.jpg"), OPTS).true_color is True
