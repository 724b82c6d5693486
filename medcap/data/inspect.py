"""Checking an image without decoding it at full size: format by content, truncation, pixel count,
stored mode, and whether its colour is real (for the colour policies).

What "true colour" means here
-----------------------------
A file stored with three channels is often a grey picture (a scanner or a figure tool wrote RGB),
and a grey radiograph with a small coloured arrow is still a grey radiograph. ``true_color`` is 1
when *colour carries a real part of the picture*: the image is decoded at 1/8 scale (JPEG draft
mode, so only the DCT DC terms are computed: cheap, and the 8x8 averaging also removes JPEG noise;
small images are reduced less, keeping at least 48 px on the short side), a pixel counts as
coloured when its channels differ by more than ``color_threshold`` levels (default 24 of 255: JPEG
noise and chroma rounding in grey-as-RGB files stay far below that), and the image is true colour
when more than ``color_fraction`` (default 1%) of its pixels are coloured. A coloured arrow, letter
or outline covers a few tenths of a percent of a figure (0.25-0.41% for the phantom arrows,
measured at this scale), a colour Doppler box a percent or more (1.05-2.1% on the phantoms, more
on real scanners), so arrow-only images count as grey with colour marks (reported separately in
stats.json) while Doppler overlays, colour maps, fused PET-CT, photographs and endoscopy count as
colour. Both numbers are options (``--color-threshold``, ``--color-fraction``).

How the two thresholds were chosen
----------------------------------
By measurement on pictures of both kinds, with a margin on each side (the cases are in
``tests/data/test_colour_policy.py`` and ``tests/data/test_prepare.py``; ROCOv2-sized 640 x 512
JPEGs, checked at 1/8 scale):

* ``color_threshold`` 24 sits between grey and colour levels. Grey whose channels differ by up to
  8 levels before saving (a colour scanner's noise), saved at JPEG quality 10-95 with 4:4:4 or
  4:2:0 chroma, differs by at most 7 levels at 1/8 scale; decoded at full size the same files
  reach 34, which is why the check decodes at 1/8 (the 8 x 8 averaging removes the noise). Below
  24 are also the grey mid-tones of blue-yellow colour maps (cividis, a linear blue-to-yellow map),
  so 32-38% of a cividis picture and 80% of a blue-to-yellow one count as coloured: far above 1%.
* ``color_fraction`` 1% sits between marks and content: a coloured arrow covers 0.25-0.41% of a
  phantom, a small activation blob 0.2%, a coloured scale ruler of 30% of the width 0.7-0.8%;
  colour content starts at the phantoms' smallest Doppler box (1.05%) and a few activation blobs
  (2%), and maps, fused PET-CT, photographs and endoscopy are mostly coloured.

What the rule cannot tell: it measures how much of the picture is coloured, not what shape or hue
the colour has. A ruler along a whole edge (1.7% coloured at 1/8 scale) makes a grey radiograph
count as colour, and so does grey tinted by a colour map (matplotlib's "bone": channels up to 32
levels apart). The margin on the fraction side is small (Doppler 1.05% against rulers 0.8%): tune
``--color-fraction`` for a collection whose marks or overlays differ.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image, ImageChops, ImageFile, UnidentifiedImageError

from medcap.data.decode_limits import (
    DEFAULT_MAX_DECODED_BYTES,
    MAX_JPEG_SCANS,
    DecodeLimitError,
    check_decoded_bytes,
    decoded_bytes_per_pixel,
    jpeg_scan_count,
)
from medcap.data.images import PIL_FORMATS, claimed_format

ColorPolicy = Literal["stored-rgb", "true-color", "all"]

COLOR_POLICIES: tuple[str, ...] = ("stored-rgb", "true-color", "all")

_EXT_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
}


_SINGLE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own Image.MAX_IMAGE_PIXELS default (~ 9459 x 9459)


@dataclass(frozen=True)
class InspectOptions:
    """What to check for each image."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels (width x height, from the header) are skipped as decompression bombs."""
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    """Images whose decoded frame would take more bytes (from the header) are skipped likewise."""
    check_color: bool = True
    """Decode multi-channel images at 1/8 scale to tell true colour from grey stored as RGB."""
    verify_decode: bool = False
    """Decode every image at 1/8 scale (also grey ones) to catch damage inside the compressed data."""
    color_threshold: int = 24
    """A pixel is coloured when max - min over its channels exceeds this (0-255)."""
    color_fraction: float = 0.01
    """An image is true colour when more than this fraction of its pixels is coloured."""


@dataclass
class ImageInfo:
    """What inspecting one image file found."""

    ok: bool
    reason: str = ""
    detail: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    true_color: bool | None = None
    color_fraction: float | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)


def _tail_has_end_marker(f: Any, size: int, fmt: str) -> bool | None:
    """Cheap truncation test: JPEG ends with EOI (FF D9), PNG with an IEND chunk. Searches the
    last 4 KiB (some writers pad after the marker). ``None`` for formats without a check."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
    if marker is None:
        return None
    n = min(size, 4096)
    f.seek(size - n)
    return marker in f.read(n)


def _color_fraction(im: Image.Image, threshold: int) -> float:
    """Fraction of pixels whose channels differ by more than ``threshold`` (max - min over R, G, B,
    which equals the largest pairwise difference). Pillow's C operations: a numpy reduction over the
    channel axis was 10x slower and dominated the colour check."""
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA") else im.convert("RGB")
    n = im.width * im.height
    if n == 0:
        return 0.0
    r, g, b = im.split()
    chroma = ImageChops.lighter(
        ImageChops.lighter(ImageChops.difference(r, g), ImageChops.difference(g, b)),
        ImageChops.difference(r, b),
    )
    return sum(chroma.histogram()[threshold + 1 :]) / n


def _reduced_decode(im: Image.Image) -> Image.Image:
    """Decode at up to 1/8 scale: JPEG draft mode (DC terms only), else decode and reduce. The
    scale keeps at least 48 pixels on the short side, so small marks stay small on small images."""
    w, h = im.size
    scale = next(s for s in (8, 4, 2, 1) if min(w, h) // s >= 48 or s == 1)
    target = (max(1, w // scale), max(1, h // scale))
    if im.format == "JPEG":
        im.draft(None, target)  # keeps the stored mode; libjpeg decodes at 1/8 scale
        im.load()
        return im
    im.load()
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    factor = max(1, min(w, h) // max(1, min(target)))
    if factor > 1 and im.mode in ("RGB", "L", "RGBA", "LA", "CMYK", "I", "F", "I;16"):
        with contextlib.suppress(ValueError):
            return im.reduce(factor)
    return im


def inspect_image(path: str, opts: InspectOptions) -> ImageInfo:
    """Check one image without decoding it at full size.

    Always: size (zero bytes), header (format, mode, width, height), pixel limit, and whether a
    JPEG/PNG ends with its end marker (a truncated file does not). A file whose tail lacks the
    marker is decoded to confirm before it is called truncated. With ``check_color`` a
    multi-channel image is decoded at 1/8 scale to measure colour; with ``verify_decode`` every
    image is. Never raises for a bad file: the reason is in the result.
    """
    info = ImageInfo(ok=False)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, and Image.open must not own it
    except OSError as e:
        info.reason, info.detail = "missing_image", f"cannot open: {e.strerror or e}"
        return info
    with f, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            info.reason, info.detail = "empty_file", "0 bytes"
            return info
        try:
            im = Image.open(f)
        except UnidentifiedImageError:
            f.seek(0)
            head = f.read(8)
            kind = claimed_format(head)
            if kind:  # the format is recognisable but its header is damaged
                info.reason, info.detail = (
                    "corrupt",
                    f"starts like a {kind} file but its header cannot be parsed",
                )
            else:
                info.reason, info.detail = (
                    "unreadable",
                    f"not a recognised image format (first bytes {head!r})",
                )
            return info
        except Image.DecompressionBombError as e:  # only if a caller re-enabled Pillow's own guard
            info.reason, info.detail = "too_many_pixels", str(e)
            return info
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            f.seek(0)
            head = f.read(8)
            kind = claimed_format(head) or "image"
            info.reason, info.detail = "corrupt", f"damaged {kind} header ({type(e).__name__}: {e})"
            return info
        with im:
            info.width, info.height = im.size
            info.mode, info.format = im.mode, im.format or ""
            if info.width <= 0 or info.height <= 0:
                info.reason, info.detail = "corrupt", f"header gives size {im.size}"
                return info
            if info.format not in PIL_FORMATS:
                # Kept images must be readable by the one image reader training and predict use.
                info.reason = "unreadable"
                info.detail = f"a {info.format} image, which medcap does not read: convert it to PNG or JPEG"
                return info
            pixels = info.width * info.height
            if pixels > opts.max_pixels:
                info.reason = "too_many_pixels"
                info.detail = f"{info.width} x {info.height} = {pixels:,} pixels > limit {opts.max_pixels:,}"
                return info
            try:
                bpp = decoded_bytes_per_pixel(info.mode)
                check_decoded_bytes(info.width, info.height, bpp, opts.max_decoded_bytes, info.mode)
            except DecodeLimitError as e:
                info.reason, info.detail = "too_many_pixels", str(e)
                return info
            if info.format in ("JPEG", "MPO") and (im.info.get("progressive") or im.info.get("progression")):
                # libjpeg runs every scan over the whole image, draft mode included: count them first.
                f.seek(0)
                scans = jpeg_scan_count(f.read(), stop_after=MAX_JPEG_SCANS)
                if scans > MAX_JPEG_SCANS:
                    info.reason = "too_many_scans"
                    info.detail = (
                        f"a progressive JPEG with more than {MAX_JPEG_SCANS} scans (real encoders write "
                        "6 to about 20): decoding it would take minutes; re-save it as a baseline JPEG or PNG"
                    )
                    return info
            ext_fmt = _EXT_FORMATS.get(os.path.splitext(path)[1].lower())
            if ext_fmt and info.format and ext_fmt != info.format:
                info.notes.append(
                    ("format_mismatch", f"{info.format} data in a {os.path.splitext(path)[1]} file")
                )
            ends_ok = _tail_has_end_marker(f, size, info.format)
            f.seek(0)
            must_decode = ends_ok is False or ends_ok is None or opts.verify_decode
            want_color = opts.check_color and info.mode not in _SINGLE_CHANNEL_MODES
            if must_decode or want_color:
                try:
                    small = _reduced_decode(im)
                    if want_color:
                        info.color_fraction = _color_fraction(small, opts.color_threshold)
                        info.true_color = info.color_fraction > opts.color_fraction
                except Image.DecompressionBombError as e:
                    info.reason, info.detail = "too_many_pixels", str(e)
                    return info
                except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
                    msg = str(e)
                    info.reason = "truncated" if "truncated" in msg or ends_ok is False else "corrupt"
                    info.detail = f"decode: {type(e).__name__}: {msg}"
                    return info
            elif opts.check_color:
                info.true_color = False  # one channel: cannot hold colour
                info.color_fraction = 0.0
        for w in caught:
            info.notes.append(("image_warning", f"{w.category.__name__}: {w.message}"))
    info.ok = True
    return info


def _worker_init() -> None:
    # Our own pixel check (from the header) replaces Pillow's global guard, so that a
    # configurable --max-pixels works in both directions; truncated files must raise.
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _inspect_job(job: tuple[int, str, InspectOptions]) -> tuple[int, ImageInfo]:
    idx, path, opts = job
    try:
        return idx, inspect_image(path, opts)
    except Exception as e:  # a Pillow bug must not kill the run: report it as this file's reason
        return idx, ImageInfo(ok=False, reason="corrupt", detail=f"unexpected {type(e).__name__}: {e}")


@contextlib.contextmanager
def _pillow_guards() -> Iterator[None]:
    old = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    _worker_init()
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old


def inspect_many(
    paths: Sequence[str], opts: InspectOptions, workers: int = 2, desc: str = "images", progress: bool = True
) -> list[ImageInfo]:
    """Inspect images in ``workers`` processes (in this process when ``workers <= 1``), in order,
    with a progress bar showing rate and ETA."""
    from tqdm.auto import tqdm

    results: list[ImageInfo | None] = [None] * len(paths)
    jobs = [(i, p, opts) for i, p in enumerate(paths)]
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, mininterval=0.5, smoothing=0.1)
    try:
        if workers <= 1 or len(jobs) < 64:
            with _pillow_guards():
                for job in jobs:
                    i, info = _inspect_job(job)
                    results[i] = info
                    bar.update()
        else:
            chunk = max(1, min(64, len(jobs) // (workers * 8)))
            with multiprocessing.get_context().Pool(workers, initializer=_worker_init) as pool:
                for i, info in pool.imap_unordered(_inspect_job, jobs, chunksize=chunk):
                    results[i] = info
                    bar.update()
    finally:
        bar.close()
    return [
        r if r is not None else ImageInfo(ok=False, reason="corrupt", detail="not inspected") for r in results
    ]


def _policy_keeps(policy: str, info: ImageInfo) -> bool:
    if policy == "all":
        return True
    if policy == "stored-rgb":
        return info.mode == "RGB"
    return bool(info.true_color)


def _policy_detail(policy: str, info: ImageInfo, opts: InspectOptions) -> str:
    if policy == "stored-rgb":
        return f"stored mode {info.mode} (stored-rgb keeps files stored with 3 channels, mode RGB)"
    frac = info.color_fraction or 0.0
    return (
        f"stored mode {info.mode}, coloured pixels {frac:.2%} <= {opts.color_fraction:.0%} "
        f"(true-color keeps images whose channels differ by > {opts.color_threshold} on > "
        f"{opts.color_fraction:.0%} of pixels)"
    )
