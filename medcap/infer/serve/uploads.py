"""Uploaded images: display-safe names, checks from the header before decoding, decoding with the
one image reader (``medcap.data.images``), and previews."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from typing import Any

from medcap.data.images import ImageReadError, image_header
from medcap.infer.serve.schemas import ServeError

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._\- ()+]")


def sanitize_filename(name: str | None, index: int) -> str:
    """A display-only version of an uploaded file name: last path component, safe characters,
    at most 100 characters. It is echoed back and never touches the file system."""
    if not name:
        return f"image{index}"
    base = re.split(r"[\\/]", name)[-1]
    base = _UNSAFE_NAME.sub("_", base).strip(" .")
    return base[:100] or f"image{index}"


def decode_upload(
    data: bytes, name: str, index: int, max_pixels: int, read: Callable[[bytes, str], Any]
) -> tuple[Any, str]:
    """Check one upload from its header, then decode it with ``read``; runs in a worker thread.

    Refusals: empty (400), not an image the reader takes (415), more than ``max_pixels`` per
    frame (413, before any pixel is decoded), undecodable (422). Returns ``(image, format)``.
    """
    label = f"files[{index}]"
    if not data:
        raise ServeError(400, "empty_file", f"{name}: the file is empty", label)
    try:
        fmt, w, h, _frames = image_header(data, name)
    except ImageReadError as e:
        if e.kind == "unsupported":
            why = (
                e.reason.removeprefix("is ")
                if e.reason.startswith("is a ")
                else "its first bytes are no image signature"
            )
            raise ServeError(
                415,
                "unsupported_format",
                f"{name}: not a JPEG, PNG, TIFF, BMP, WebP or DICOM file ({why})",
                label,
            ) from None
        raise ServeError(422, "unreadable_image", f"{name}: {e.reason}", label) from None
    # Per frame, as the reader decodes only one frame of a multi-frame DICOM.
    if w * h > max_pixels:
        raise ServeError(
            413,
            "too_many_pixels",
            f"{name}: {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} (downscale it)",
            label,
        )
    try:
        image = read(data, name)
    except ImageReadError as e:
        raise ServeError(422, "unreadable_image", f"{name}: {e}", label) from None
    except Exception as e:  # a decoder bug on hostile input is still the file's fault
        raise ServeError(
            422, "unreadable_image", f"{name}: could not decode the {fmt} image: {e}", label
        ) from None
    return image, fmt


def png_data_url(image: Any, max_side: int = 512) -> str:
    """A downscaled PNG of ``image`` as a data URL (browsers cannot show DICOM themselves)."""
    im = image.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = ["decode_upload", "png_data_url", "sanitize_filename"]
