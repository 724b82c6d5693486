"""Uploaded images: display-safe names, checks from the header before decoding, decoding with the
one image reader (``medcap.data.images``), previews, and the reduced copy that waits for the model."""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medcap.data.images import ImageHeader, ImageReadError, image_header, plain_message
from medcap.infer.serve.schemas import ServeError, ServeLimits

#: The side queued images are reduced towards when the model does not say its own.
DEFAULT_QUEUE_SIDE = 224

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._\- ()+]")


def sanitize_filename(name: str | None, index: int) -> str:
    """A display-only version of an uploaded file name: last path component, safe characters,
    at most 100 characters. It is echoed back and never touches the file system."""
    if not name:
        return f"image{index}"
    base = re.split(r"[\\/]", name)[-1]
    base = _UNSAFE_NAME.sub("_", base).strip(" .")
    return base[:100] or f"image{index}"


def check_upload(data: bytes, name: str, index: int, limits: ServeLimits) -> ImageHeader:
    """Check one upload from its header, before anything is decoded; runs in a worker thread.

    Refusals: empty (400), not an image the reader takes (415), more than ``max_pixels`` per
    frame or a decoded frame over ``max_decoded_bytes`` or a decode that could never fit the decode
    budget, or a decoding-time bomb (413), a damaged header (422). Returns the header.
    """
    label = f"files[{index}]"
    if not data:
        raise ServeError(400, "empty_file", f"{name}: the file is empty", label)
    try:
        header = image_header(data, name)
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
        if e.kind == "too_large":
            raise ServeError(413, "decode_limit", f"{name}: {e}", label) from None
        raise ServeError(422, "unreadable_image", f"{name}: {e.reason}", label) from None
    w, h = header.width, header.height
    # Per frame, as the reader decodes only one frame of a multi-frame DICOM.
    if w * h > limits.max_pixels:
        raise ServeError(
            413,
            "too_many_pixels",
            f"{name}: {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,} (downscale it)",
            label,
        )
    if (
        header.decoded_bytes > limits.max_decoded_bytes
        or header.decode_peak_bytes > limits.decode_budget_bytes
    ):
        raise ServeError(
            413,
            "decode_limit",
            f"{name}: {w}x{h} at {header.bytes_per_pixel} bytes per pixel takes "
            f"{header.decoded_bytes / 2**20:,.0f} MiB once decoded; the limit is "
            f"{limits.max_decoded_bytes / 2**20:,.0f} MiB (downscale it, or send 8-bit samples)",
            label,
        )
    return header


@dataclass
class DecodedUpload:
    """One decoded upload, as it waits for the model: the image reduced towards the model's input
    size (the full-size decode never leaves the decoding thread), with what the answer reports."""

    name: str
    format: str
    width: int
    height: int
    image: Any
    preview: str | None
    decode_ms: float


def decode_upload(
    data: bytes,
    name: str,
    index: int,
    header: ImageHeader,
    read: Callable[[bytes, str], Any],
    shrink: Callable[[Any], Any],
    preview: bool,
) -> DecodedUpload:
    """Decode a checked upload with ``read`` (the one image reader), make its preview, and ``shrink``
    it for the queue; runs in a decoding thread. Undecodable: 422; over a limit found while decoding
    (a deflated DICOM's size, a JPEG frame's scans): 413."""
    label = f"files[{index}]"
    t0 = time.perf_counter()
    try:
        image = read(data, name)
    except ImageReadError as e:
        # str(e) starts with the upload's name already (read() was given it).
        if e.kind == "too_large":
            raise ServeError(413, "decode_limit", str(e), label) from None
        raise ServeError(422, "unreadable_image", str(e), label) from None
    except Exception as e:  # a decoder bug on hostile input is still the file's fault
        raise ServeError(
            422,
            "unreadable_image",
            f"{name}: could not decode the {header.format} image: {plain_message(e)}",
            label,
        ) from None
    width, height = image.size
    shown = png_data_url(image) if preview else None
    small = shrink(image)
    return DecodedUpload(
        name, header.format, width, height, small, shown, (time.perf_counter() - t0) * 1000.0
    )


def reduce_for_queue(image: Any, model_side: int | None) -> Any:
    """``image`` box-reduced by an integer factor (Pillow's ``reduce``) so that its short side stays
    at least twice the model's side: what the service queues when the processor's own resize cannot
    be done early (``medcap.model.family.processor_resizer``). Reducing by a box first and letting
    the processor resize the rest of the way is what Pillow's ``reducing_gap`` does."""
    side = model_side or DEFAULT_QUEUE_SIDE
    factor = min(image.size) // (2 * side)
    return image.reduce(factor) if factor >= 2 else image


def png_data_url(image: Any, max_side: int = 512) -> str:
    """A downscaled PNG of ``image`` as a data URL (browsers cannot show DICOM themselves)."""
    im = image.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = [
    "DecodedUpload",
    "check_upload",
    "decode_upload",
    "png_data_url",
    "reduce_for_queue",
    "sanitize_filename",
]
