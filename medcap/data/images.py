"""The one image reader: every stage that decodes an image for a model reads it here.

Training, the query cache, ``medcap predict``, ``medcap caption``, the service and the report call
``read_image(source, min_size=...)`` with a path or the raw bytes of an upload and get a 3-channel
8-bit Pillow image, so a file is seen the same way everywhere (an EXIF-rotated JPEG, a 16-bit TIFF,
a DICOM). What it does per format:

* JPEG / PNG / TIFF / BMP / WebP (Pillow): EXIF orientation applied; grey, palette, CMYK and
  transparent images converted (transparent areas become black, the usual radiology background);
  16-bit and float grey (``I;16``, ``I``, ``F``) scaled to 8 bit by the image's own min and max.
  The first page of a multi-page TIFF. ``min_size``: JPEGs decode in
  draft mode (the decoder scales by 1/2, 1/4 or 1/8) keeping both sides at ``min_size`` or more:
  pass the model's input side, which the processor resizes to anyway (half the CPU time for a
  ROCOv2-sized JPEG).
* DICOM (pydicom), recognised by the ``DICM`` marker after the 128-byte preamble whatever the file
  is called, and also by a ``.dcm``/``.dicom`` name for old files without a preamble:
  the Modality LUT (rescale slope and intercept, or a LUT sequence) first, then the VOI LUT or the
  window centre/width (LINEAR, LINEAR_EXACT, SIGMOID) when present, else the min-max range;
  MONOCHROME1 inverted so bone is white; the middle frame of a multi-frame file; palette colour
  through its LUT; YBR converted to RGB; compressed transfer syntaxes through whatever decoder
  plugin is installed, with an error naming the packages to install when none can decode it.

Every failure is an ``ImageReadError`` that names the file, says what is wrong and what to do.
One decode budget holds for every format, checked from the header before any pixel is decoded
(``medcap.data.decode_limits``): a pixel-count limit and a limit on the bytes of the decoded frame
stop decompression bombs, progressive JPEGs with absurdly many scans are refused (also a JPEG frame
inside a DICOM), and a deflated DICOM is inflated in steps under a byte cap instead of all at once.
The float work of 16-bit and DICOM images (rescale, window, min-max) runs in strips of rows, so it
needs a few MiB beyond the decoded frame, not eight times it; the result is the same to the bit.
``image_header`` reads format, size and decoded size without decoding, for checks before a request
is queued. This module imports no torch, so the service and the data tools can use it cheaply.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medcap.data.decode_limits import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFLATED_TRANSFER_SYNTAX,
    DICOM_HEADER_PREFIX_BYTES,
    DICOM_HEADER_SLACK_BYTES,
    DamagedDataError,
    DecodeLimitError,
    check_decoded_bytes,
    check_jpeg_scans,
    decode_peak_bytes,
    decoded_bytes_per_pixel,
    dicom_transfer_syntax,
    inflate_dicom,
)

#: Default pixel-count limit (width x height, per frame). 100 megapixels is well above any
#: radiograph or mammogram (about 4,000 x 5,000) but stops a small file that would expand to
#: gigabytes of pixels.
DEFAULT_MAX_PIXELS = 100_000_000

#: File name suffixes taken as images when walking a folder (DICOM files without a suffix are
#: recognised by their content).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom"})

#: What the reader takes, by content (as ``image_header`` names the formats).
SUPPORTED_FORMATS = ("jpeg", "png", "tiff", "bmp", "webp", "dicom")

#: Pillow formats accepted (MPO is the multi-picture JPEG some cameras write).
PIL_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP"})

_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: First bytes of the image formats a file may claim to be (to tell "damaged" from "not an image").
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"RIFF", "WEBP"),
)


def claimed_format(head: bytes) -> str | None:
    """The format whose signature ``head`` starts with, or None."""
    return next((kind for sig, kind in SIGNATURES if head.startswith(sig)), None)


class ImageReadError(ValueError):
    """An image could not be read; ``str()`` names the file, the problem and what to do.

    ``kind`` says which: ``unsupported`` (not an image format this reader takes), ``too_large``
    (over the pixel or decoded-bytes limit), ``beyond_model`` (readable, but outside what the model
    family takes, e.g. Qwen-VL's 200:1 aspect ratio), or ``unreadable`` (missing, empty, corrupt,
    truncated ...).
    """

    def __init__(self, name: str, reason: str, hint: str = "", kind: str = "unreadable") -> None:
        self.name = name
        self.reason = reason
        self.hint = hint
        self.kind = kind
        super().__init__(f"{name}: {reason}" + (f". {hint}" if hint else ""))


def is_dicom_bytes(head: bytes) -> bool:
    """True when ``head`` (the first 132 bytes or more) carries the DICOM Part 10 ``DICM`` marker."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | Path) -> bool:
    """True when the file at ``path`` starts like a DICOM Part 10 file (checks content, not name)."""
    try:
        with open(path, "rb") as f:
            return is_dicom_bytes(f.read(132))
    except OSError:
        return False


def read_image(
    source: str | Path | bytes | bytearray | memoryview,
    name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """Read a JPEG, PNG, TIFF, BMP, WebP or DICOM image from a path or bytes, as RGB (8 bit).

    ``name`` is used in error messages and, for bytes, as the hint for old DICOM files without a
    preamble (``.dcm``); it defaults to the path. ``max_pixels`` bounds width x height (one frame),
    ``max_decoded_bytes`` the bytes of the decoded frame (after draft mode), both checked before any
    pixel is decoded. ``min_size``: decode JPEGs at a reduced scale that keeps both sides at least
    this (the model's input side); None decodes at full size. Raises ``ImageReadError`` for
    anything that cannot be read (``kind="too_large"`` for anything over a limit).
    """
    if min_size is not None and (not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"read_image: min_size must be a positive integer or None, got {min_size!r}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_decoded_bytes <= 0:
        raise ValueError(f"max_decoded_bytes must be positive, got {max_decoded_bytes}")
    limits = _Limits(max_pixels, max_decoded_bytes)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        label = name or "<uploaded image>"
        if not data:
            raise ImageReadError(label, "is empty (0 bytes)", "Re-export or re-copy the file")
        head: bytes = data[:132]
        opened: Path | io.BytesIO = io.BytesIO(data)
    else:
        path = Path(source)
        label = name or str(path)
        head = _file_head(path, label)
        opened = path  # Pillow reads only what it decodes (draft mode reads little)

    if is_dicom_bytes(head):
        return _read_dicom(_all_bytes(opened, label), label, limits, force=False)
    try:
        return _read_pil(opened, label, limits, min_size)
    except _NotPillowImage:
        pass
    # Old DICOM files (ACR-NEMA style, no preamble) can only be recognised by their name.
    if label.lower().endswith(_DICOM_SUFFIXES):
        return _read_dicom(_all_bytes(opened, label), label, limits, force=True)
    raise ImageReadError(
        label,
        "is not a recognised image (neither JPEG, PNG, TIFF, BMP, WebP nor DICOM)",
        "Convert it to PNG or JPEG, or check that it is not corrupt",
        kind="unsupported",
    )


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    format: str
    """``dicom``, or Pillow's format name in lower case (``jpeg``, ``png`` ...)."""
    width: int
    height: int
    frames: int = 1
    """Frames (DICOM) or pages (TIFF); the reader decodes one."""
    bytes_per_pixel: int = 4
    """Bytes per pixel of the decoded frame (Pillow's layout; DICOM: samples x bytes per sample)."""

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """Bytes of one decoded frame at full size."""
        return self.pixels * self.bytes_per_pixel

    @property
    def decode_peak_bytes(self) -> int:
        """A bound on the memory ``read_image`` needs to read this image (see ``decode_limits``)."""
        return decode_peak_bytes(self.width, self.height, self.bytes_per_pixel)


def image_header(data: bytes, name: str = "<uploaded image>") -> ImageHeader:
    """Format, size and decoded size from an image's header, without decoding its pixels.

    Raises ``ImageReadError`` when the bytes are no image this reader takes, and (``too_large``) for a
    progressive JPEG with more scans than ``MAX_JPEG_SCANS`` or a deflated DICOM whose header does not
    fit in the first ``DICOM_HEADER_PREFIX_BYTES`` once inflated.
    """
    if not data:
        raise ImageReadError(name, "is empty (0 bytes)", "Re-export or re-copy the file")
    if is_dicom_bytes(data[:132]) or name.lower().endswith(_DICOM_SUFFIXES):
        import pydicom

        is_part10 = is_dicom_bytes(data[:132])
        try:
            if is_part10 and dicom_transfer_syntax(data) == DEFLATED_TRANSFER_SYNTAX:
                data = inflate_dicom(data, DICOM_HEADER_PREFIX_BYTES, prefix=True)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=not is_part10)
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = _number_of_frames(ds)
            bpp = _dicom_bytes_per_pixel(ds)
        except DecodeLimitError as e:
            raise _too_large(name, e) from None
        except Exception as e:  # noqa: BLE001 - pydicom raises many kinds on damaged files
            raise ImageReadError(
                name, f"has a DICOM header that cannot be read ({_first_line(e)})", "Re-export it"
            ) from e
        return ImageHeader("dicom", cols, rows, frames, bpp)
    with warnings.catch_warnings():
        # Pillow warns (and past twice its limit, raises) about huge images; callers check the size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h), mode = im.format, im.size, im.mode
                frames = int(getattr(im, "n_frames", 1) or 1)
                progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        except UnidentifiedImageError as e:
            claimed = claimed_format(data[:8])
            if claimed in PIL_FORMATS:  # it says it is one, but its header is damaged
                raise ImageReadError(
                    name, f"starts like a {claimed} file but its header cannot be parsed", "Re-export it"
                ) from e
            raise ImageReadError(
                name,
                "is not a recognised image (neither JPEG, PNG, TIFF, BMP, WebP nor DICOM)",
                "Convert it to PNG or JPEG",
                kind="unsupported",
            ) from e
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on damaged headers
            raise ImageReadError(
                name, f"has a header that cannot be read ({plain_message(e)})", "Re-export it"
            ) from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if fmt not in PIL_FORMATS:
        raise ImageReadError(
            name,
            f"is a {fmt} image, which is not supported",
            f"Convert it to PNG or JPEG (supported: {', '.join(sorted(PIL_FORMATS))}, DICOM)",
            kind="unsupported",
        )
    if progressive and fmt in ("JPEG", "MPO"):
        try:
            check_jpeg_scans(data)
        except DecodeLimitError as e:
            raise _too_large(name, e) from None
    return ImageHeader("jpeg" if fmt == "MPO" else fmt.lower(), w, h, frames, decoded_bytes_per_pixel(mode))


@dataclass(frozen=True)
class _Limits:
    max_pixels: int
    max_decoded_bytes: int


def _too_large(label: str, e: DecodeLimitError) -> ImageReadError:
    return ImageReadError(label, str(e), e.hint, kind="too_large")


_OBJECT_REPR = re.compile(r"<[A-Za-z_][\w.]* object at 0x[0-9A-Fa-f]+>")


def plain_message(e: BaseException) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x7f...>``: a heap
    address means nothing to a user and should not leave the process)."""
    return _OBJECT_REPR.sub("the data", str(e)).strip() or type(e).__name__


def _file_head(path: Path, label: str) -> bytes:
    """The first 132 bytes of a file (enough for the DICOM marker), with errors that say what to do."""
    if not path.exists():
        raise ImageReadError(label, "file does not exist", "Check the path")
    if not path.is_file():
        raise ImageReadError(label, "is not a regular file (a folder?)", "Pass image files or a folder")
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as e:
        raise ImageReadError(label, f"cannot be read ({e.strerror or e})", "Check its permissions") from e
    if not head:
        raise ImageReadError(label, "is empty (0 bytes)", "Re-export or re-copy the file")
    return head


def _all_bytes(opened: Path | io.BytesIO, label: str) -> bytes:
    if isinstance(opened, io.BytesIO):
        return opened.getvalue()  # shares the buffer of the bytes it was made from: no copy
    try:
        return opened.read_bytes()
    except OSError as e:
        raise ImageReadError(label, f"cannot be read ({e.strerror or e})", "Check its permissions") from e


# ----------------------------------------------------------------------------------------------
# Pillow formats


class _NotPillowImage(Exception):
    """Pillow does not recognise the bytes at all (the caller may still try DICOM)."""


def _read_pil(source: Path | io.BytesIO, label: str, limits: _Limits, min_size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # We enforce our own pixel limit below, from the header, before decoding.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except UnidentifiedImageError as e:
            raise _NotPillowImage from e
        except Image.DecompressionBombError as e:
            raise ImageReadError(
                label,
                f"is too large to decode safely ({e})",
                "Downscale it before captioning",
                kind="too_large",
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(
                label, f"is corrupt ({plain_message(e)})", "Re-export or re-download the file"
            ) from e
        if im.format not in PIL_FORMATS:
            raise ImageReadError(
                label,
                f"is a {im.format} image, which is not supported",
                f"Convert it to PNG or JPEG (supported: {', '.join(sorted(PIL_FORMATS))}, DICOM)",
                kind="unsupported",
            )
        w, h = im.size
        _check_pixels(label, w, h, limits.max_pixels)
        try:
            if im.format in ("JPEG", "MPO") and (im.info.get("progressive") or im.info.get("progression")):
                check_jpeg_scans(_all_bytes(source, label))
            if min_size is not None and im.format == "JPEG":
                # Mode "RGB" changes no colour handling (Pillow only converts when L or YCbCr is asked
                # for); only the DCT scale is set. Both sides stay >= min_size.
                im.draft("RGB", (min_size, min_size))
            check_decoded_bytes(*im.size, decoded_bytes_per_pixel(im.mode), limits.max_decoded_bytes)
        except DecodeLimitError as e:
            raise _too_large(label, e) from None
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageReadError(
                label, f"is too large to decode safely ({e})", "Downscale it", kind="too_large"
            ) from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # Pillow says "image file is truncated" or "broken data stream" here.
            raise ImageReadError(
                label,
                f"has truncated or corrupt image data ({plain_message(e)})",
                "Re-export or re-download the file",
            ) from e
    try:
        oriented = ImageOps.exif_transpose(im)  # a new image, turned upright when EXIF says so
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        oriented = im
    rgb = _pil_to_rgb(oriented)
    if rgb is im:
        rgb = im.copy()  # detached from the file, which is closed next
    im.close()
    return rgb


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit / float grey: Pillow's own convert clips to 0..255; scale by range instead.
        values = np.asarray(im)
        return _rgb_image(_uint8_in_strips(values, _minmax_transform(_finite_range(values, _as_float64))))
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(data: bytes, label: str, limits: _Limits, *, force: bool) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not force and dicom_transfer_syntax(data) == DEFLATED_TRANSFER_SYNTAX:
        data = _inflate_deflated(data, label, limits)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError as e:
        raise ImageReadError(
            label, f"is not a valid DICOM file ({plain_message(e)})", "Re-export it from the PACS"
        ) from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageReadError(
            label,
            f"is a corrupt or truncated DICOM file ({type(e).__name__}: {plain_message(e)})",
            "Re-export it",
        ) from e
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(ds, "SOPClassUID", None)
        kind_name = getattr(kind, "name", None) or "DICOM object"
        raise ImageReadError(
            label,
            f"holds no image (it is a {kind_name} without pixel data)",
            "Pass the DICOM image files of the series, not reports or structure sets",
        )
    _ensure_transfer_syntax(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise ImageReadError(label, "has pixel data but no valid Rows/Columns", "Re-export it") from e
    _check_pixels(label, cols, rows, limits.max_pixels)
    frames = _number_of_frames(ds)
    index = frames // 2 if frames > 1 else None  # the middle frame of a cine loop or volume
    try:
        check_decoded_bytes(cols, rows, _dicom_bytes_per_pixel(ds), limits.max_decoded_bytes)
        _check_jpeg_frame(ds, index or 0, frames)
    except DecodeLimitError as e:
        raise _too_large(label, e) from None
    _lift_functional_groups(ds, index or 0)
    arr = _decode_dicom_pixels(ds, label, index)
    if arr.ndim == 3 and index is None and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        arr = arr[arr.shape[0] // 2]  # a decoder returned all frames anyway
    return _dicom_to_rgb(arr, ds, label)


def _dicom_bytes_per_pixel(ds) -> int:
    """Bytes per pixel of one decoded frame: samples x bytes per sample (1-bit data unpacks to 1 byte)."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if "FloatPixelData" in ds:
        return samples * 4
    if "DoubleFloatPixelData" in ds:
        return samples * 8
    bits = int(ds.get("BitsAllocated", 16) or 16)
    return samples * max(1, (bits + 7) // 8)


def _inflate_deflated(data: bytes, label: str, limits: _Limits) -> bytes:
    """A deflated DICOM, inflated under a byte cap: its header first (a bounded prefix), the size
    checks, then the whole stream capped at what the header says the pixels need."""
    import pydicom

    try:
        head = pydicom.dcmread(
            io.BytesIO(inflate_dicom(data, DICOM_HEADER_PREFIX_BYTES, prefix=True)), stop_before_pixels=True
        )
        rows, cols = int(head.Rows), int(head.Columns)
        frames, bpp = _number_of_frames(head), _dicom_bytes_per_pixel(head)
    except DecodeLimitError as e:
        raise _too_large(label, e) from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageReadError(
            label, f"is a deflated DICOM whose header cannot be read ({_first_line(e)})", "Re-export it"
        ) from e
    _check_pixels(label, cols, rows, limits.max_pixels)
    needed = rows * cols * frames * bpp  # every frame is inflated, not only the one decoded
    if needed > limits.max_decoded_bytes:
        raise ImageReadError(
            label,
            f"is a deflated DICOM of {frames} frame(s) of {cols}x{rows} that takes "
            f"{needed / 2**20:,.0f} MiB once inflated; the limit is {limits.max_decoded_bytes / 2**20:,.0f} MiB",
            "Re-export it uncompressed or with an image compression (JPEG, RLE)",
            kind="too_large",
        )
    try:
        return inflate_dicom(data, needed + DICOM_HEADER_SLACK_BYTES)
    except DecodeLimitError as e:
        raise _too_large(label, e) from None
    except DamagedDataError as e:
        raise ImageReadError(label, str(e), "Re-export it") from None


def _check_jpeg_frame(ds, index: int, frames: int) -> None:
    """The scan limit for the JPEG frame that will be decoded, when the pixel data holds JPEG."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not getattr(tsyntax, "is_compressed", False) or "PixelData" not in ds:
        return
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception:  # noqa: BLE001 - a broken encapsulation is reported by the decoder itself
        return
    if frame[:2] == b"\xff\xd8":
        check_jpeg_scans(frame)


def _ensure_transfer_syntax(ds) -> None:
    """Old files without file meta: record the encoding pydicom detected so pixels can be decoded."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit = getattr(ds, "original_encoding", (None, None))[0]
    little = getattr(ds, "original_encoding", (None, True))[1]
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian


def _install_hints(missing: list[str]) -> str:
    """pydicom's 'gdcm - requires gdcm>=3.0.10' lines -> pip commands a user can paste."""
    commands = []
    for line in missing:
        specs = re.findall(r"[A-Za-z][\w.-]*(?:[<>=!~]=?[\w.]+)?", line.split("requires", 1)[-1])
        pkgs = [s for s in specs if s.split(">")[0].split("=")[0] not in ("and", "numpy")]
        # gdcm's Python bindings are published on PyPI as python-gdcm.
        pkgs = ["python-" + s if s.startswith("gdcm") else s for s in pkgs]
        if pkgs:
            commands.append("pip install " + " ".join(f"'{s}'" for s in pkgs))
    return " or ".join(commands)


#: Enhanced multi-frame objects (Enhanced CT / MR / XA ...) keep rescale and window settings in
#: functional groups, per frame or shared, instead of at the top level.
_FUNCTIONAL_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def _lift_functional_groups(ds, index: int) -> None:
    """Copy the frame's rescale and window settings to the top level, where the LUT code reads them.

    The frame's own (per-frame) group wins over the shared one; top-level values are kept if present.
    """
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for sequence, keywords in _FUNCTIONAL_GROUPS.items():
        if any(k in ds for k in keywords[:2]):
            continue
        for group in groups:
            items = group.get(sequence)
            if items:
                for k in keywords:
                    if k in items[0]:
                        setattr(ds, k, items[0][k].value)
                break


def _number_of_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _decode_dicom_pixels(ds, label: str, index: int | None) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array

    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return pixel_array(ds, index=index)
    except Exception as e:  # noqa: BLE001 - decoders raise RuntimeError, ValueError, NotImplementedError...
        ts_name = getattr(tsyntax, "name", None) or str(tsyntax or "unknown")
        decoder = None
        if tsyntax is not None and getattr(tsyntax, "is_compressed", False):
            try:
                decoder = get_decoder(tsyntax)
            except NotImplementedError:
                raise ImageReadError(
                    label,
                    f"uses the transfer syntax '{ts_name}', which pydicom cannot decompress",
                    "Convert it to an uncompressed DICOM (e.g. 'gdcmconv --raw' or 'dcmdjpeg') or to PNG",
                ) from e
        if decoder is not None:
            hints = _install_hints(list(decoder.missing_dependencies))
            if not decoder.is_available:
                raise ImageReadError(
                    label,
                    f"is compressed as '{ts_name}' and no decoder plugin for it is installed",
                    f"Install one, then retry: {hints}" if hints else "Install a pydicom decoder plugin",
                ) from e
            plugins = ", ".join(decoder.available_plugins)
            detail = _first_line(e)
            for plugin in decoder.available_plugins:
                detail = detail.removeprefix(f"{plugin}: ")
            raise ImageReadError(
                label,
                f"is compressed as '{ts_name}' and the installed decoder ({plugins}) failed: {detail}",
                f"Another decoder plugin may read it: {hints}" if hints else "Re-export it uncompressed",
            ) from e
        raise ImageReadError(
            label, f"has pixel data that cannot be decoded ({_first_line(e)})", "Re-export it"
        ) from e


def _first_line(e: BaseException) -> str:
    text = plain_message(e)
    for line in text.splitlines():
        if line.strip() and not line.strip().endswith(":"):
            return line.strip()
    return text or type(e).__name__


def _dicom_to_rgb(arr: np.ndarray, ds, label: str) -> Image.Image:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)

    if photometric == "PALETTE COLOR":
        return _palette_to_rgb(arr, ds, label)

    if samples == 3 or arr.ndim == 3:
        if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
            raise ImageReadError(
                label, f"has the unsupported colour model {photometric}", "Convert it to RGB or grey"
            )
        # pixel_array already converts YBR_FULL(_422) to RGB, and the JPEG / JPEG 2000 decoders
        # undo their colour transforms, so what is left is RGB at BitsStored depth.
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
        return _rgb_image(_uint8_in_strips(arr, _colour_transform(arr, bits)))

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(label, f"has the unsupported photometric interpretation {photometric}", "")

    def modality(strip: np.ndarray) -> np.ndarray:
        return _modality_lut(strip, ds)

    to_unit = _voi_transform(ds, modality(arr[:1]))
    if to_unit is None:
        to_unit = _minmax_transform(_finite_range(arr, modality))
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores "bright = low values"; invert so bone is white as on a viewer.
        def display(strip: np.ndarray) -> np.ndarray:
            return 1.0 - to_unit(modality(strip))
    else:

        def display(strip: np.ndarray) -> np.ndarray:
            return to_unit(modality(strip))

    return _rgb_image(_uint8_in_strips(arr, display))


def _palette_to_rgb(arr: np.ndarray, ds, label: str) -> Image.Image:
    """Palette colour through its LUT, strip by strip (the LUT output is 3 x 16 bit per pixel)."""
    from pydicom.pixels import apply_color_lut

    def lut(strip: np.ndarray) -> np.ndarray:
        return apply_color_lut(strip, ds)

    step = _strip_rows(arr)
    try:
        wide = lut(arr[:1]).dtype.itemsize > 1
        top = max(float(lut(arr[r : r + step]).max()) for r in range(0, arr.shape[0], step)) if wide else 0.0
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(
            label, f"has a broken palette colour table ({plain_message(e)})", "Re-export it"
        ) from e
    scale = _colour_transform_for(wide, top, bits=16 if wide else 8)
    return _rgb_image(_uint8_in_strips(arr, lambda strip: scale(lut(strip))))


def _modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units): rescale or Modality LUT Sequence."""
    from pydicom.pixels import apply_modality_lut

    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    try:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a malformed LUT: fall back to the stored values
        return arr.astype(np.float64)


def _voi_transform(ds, probe: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """Modality values -> display values in [0, 1]: the VOI LUT, else the window; None means the
    image's own min-max range. ``probe`` (a row of modality values) tries the VOI LUT once, so a
    malformed one falls back to the window as a whole, not strip by strip."""
    seq = ds.get("VOILUTSequence")
    if seq:
        from pydicom.pixels import apply_voi

        def via_lut(values: np.ndarray) -> np.ndarray:
            out = np.asarray(apply_voi(values.round().astype(np.int64), ds), dtype=np.float64)
            return np.clip(out / top, 0.0, 1.0)

        try:
            lut_data = np.asarray(seq[0].LUTData, dtype=np.float64).ravel()
            top = float(lut_data.max()) if lut_data.size else 0.0
            if top > 0:
                via_lut(probe)
                return via_lut
        except Exception:  # noqa: BLE001 - fall through to windowing or min-max
            pass
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "SIGMOID":
            return lambda values: 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if function == "LINEAR_EXACT":
            return lambda values: np.clip((values - center) / width + 0.5, 0.0, 1.0)
        if width >= 1:
            # DICOM PS3.3 C.11.2.1.2.1 (LINEAR): the half-pixel offsets are in the standard.
            return lambda values: np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return None


def _first_number(value) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, list | tuple) or hasattr(value, "__getitem__") and not isinstance(value, str):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _colour_transform(arr: np.ndarray, bits: int) -> Callable[[np.ndarray], np.ndarray]:
    """Colour samples at ``bits`` depth -> floats in [0, 1] (the range is the whole image's)."""
    wide = not (arr.dtype == np.uint8 or bits <= 8)
    return _colour_transform_for(wide, float(arr.max()) if wide and arr.size else 0.0, bits)


def _colour_transform_for(wide: bool, top: float, bits: int) -> Callable[[np.ndarray], np.ndarray]:
    if not wide:
        return lambda a: np.clip(a.astype(np.float64) / 255.0, 0.0, 1.0)
    if top <= 255.0:
        # Declared 16-bit but holding 8-bit values (common for palettes): keep them 8-bit.
        return lambda a: a.astype(np.float64) / 255.0
    return lambda a: np.clip(a.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(label, f"has an invalid size {width}x{height}", "Re-export it")
    if width * height > max_pixels:
        raise ImageReadError(
            label,
            f"is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb or a very large scan)",
            "Downscale it, or raise the pixel limit if the image is genuine",
            kind="too_large",
        )


#: Values taken through float64 at a time (8 MiB of floats): the float work of a large 16-bit or
#: DICOM image needs this much beyond the decoded frame, not several full-size float copies (an
#: RLE 16-bit colour DICOM of 3.4 MB cost 3.1 GB that way).
_STRIP_VALUES = 1 << 20


def _strip_rows(arr: np.ndarray) -> int:
    per_row = int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1
    return max(1, _STRIP_VALUES // max(1, per_row))


def _as_float64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _finite_range(
    arr: np.ndarray, to_values: Callable[[np.ndarray], np.ndarray]
) -> tuple[float, float] | None:
    """The smallest and largest finite value of ``to_values(arr)``, taken strip by strip; None when
    no value is finite."""
    lo, hi = np.inf, -np.inf
    step = _strip_rows(arr)
    for r in range(0, arr.shape[0], step):
        values = to_values(arr[r : r + step])
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return None if lo > hi else (lo, hi)


def _minmax_transform(value_range: tuple[float, float] | None) -> Callable[[np.ndarray], np.ndarray]:
    """Scale to [0, 1] by the image's own finite range (a constant image becomes black)."""
    if value_range is None or value_range[1] <= value_range[0]:
        return lambda a: np.zeros(np.shape(a))
    lo, hi = value_range

    def scale(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return np.clip(np.where(np.isfinite(a), (a - lo) / (hi - lo), 0.0), 0.0, 1.0)

    return scale


def _uint8_in_strips(arr: np.ndarray, to_unit: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``to_unit`` (values -> floats in [0, 1]) on strips of rows, each rounded to 8 bit: the same
    bytes as on the whole array, with the float temporaries bounded by ``_STRIP_VALUES``."""
    out: np.ndarray | None = None
    step = _strip_rows(arr)
    for r in range(0, arr.shape[0], step):
        unit = np.asarray(to_unit(arr[r : r + step]))
        if out is None:  # a palette strip gains a channel axis
            out = np.empty((arr.shape[0], *unit.shape[1:]), dtype=np.uint8)
        out[r : r + step] = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return out if out is not None else np.zeros(arr.shape, dtype=np.uint8)


def _rgb_image(a: np.ndarray) -> Image.Image:
    """8-bit samples, shape (H, W) or (H, W, 3) -> RGB Pillow image."""
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim == 3 and a.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(a), "RGB")
    raise ValueError(f"unexpected pixel array shape {a.shape}")


__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "PIL_FORMATS",
    "SUPPORTED_FORMATS",
    "ImageHeader",
    "ImageReadError",
    "image_header",
    "is_dicom_bytes",
    "is_dicom_file",
    "plain_message",
    "read_image",
]
