"""What decoding an image may cost, checked before the costly part runs.

A small file can expand to far more memory or CPU time than its size suggests. The image reader
(``medcap.data.images``) checks these before it decodes pixels:

* **decoded bytes**: width x height x bytes per pixel of one decoded frame, from the header
  (``decoded_bytes_per_pixel``), against ``max_decoded_bytes``; a blank 6000 x 6000 PNG is 35 KB.
* **progressive JPEG scans**: libjpeg processes every scan over the whole image, so a file of one
  empty scan repeated 20,000 times (270 KB) took 55 s to decode, draft mode included.
  ``jpeg_scan_count`` walks the segments (no decoding) and ``MAX_JPEG_SCANS`` caps them.
* **deflated DICOM** (transfer syntax 1.2.840.10008.1.2.1.99): the whole dataset is one deflate
  stream, so Rows and Columns can only be read after inflating; pydicom inflates all of it at once
  (1 MB became 1 GiB). ``inflate_dicom`` inflates a bounded prefix for the header, and the whole
  stream only under a byte cap, in steps, then hands pydicom an equivalent uncompressed file.

Nothing here imports torch or pydicom; numbers and bytes only.
"""

from __future__ import annotations

import re
import struct
import zlib

#: Default largest decoded frame, in bytes (width x height x bytes per pixel as decoded). 512 MiB
#: holds a 100-megapixel 8-bit colour image in Pillow's 4-bytes-per-pixel layout, or a 16-bit
#: grey mammogram many times over; the service sets a lower limit of its own.
DEFAULT_MAX_DECODED_BYTES = 512 * 1024 * 1024

#: Most scans a progressive JPEG may have. Encoders write 6 (grey) to 10 (colour) with libjpeg's
#: default script, and scan-optimising encoders stay near 20; each further scan costs a pass over
#: every block of the image (about 1 ms per megapixel here), so 64 bounds the work of a hostile file
#: to a few times that of a real one.
MAX_JPEG_SCANS = 64

#: How much of a deflated DICOM is inflated to read its header (everything before the pixels).
DICOM_HEADER_PREFIX_BYTES = 4 * 1024 * 1024

#: Room for the elements around the pixel data when a deflated DICOM is inflated in full.
DICOM_HEADER_SLACK_BYTES = 16 * 1024 * 1024

DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

_INFLATE_STEP = 1 << 20


class DecodeLimitError(ValueError):
    """Decoding would go past a limit; ``str()`` says which and by how much (no file name: the
    caller adds it), ``hint`` what to do."""

    def __init__(self, reason: str, hint: str = "Downscale it, or raise the limit if the image is genuine"):
        super().__init__(reason)
        self.hint = hint


def decoded_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel of a decoded Pillow image of ``mode`` (Pillow keeps 3- and 4-band 8-bit images
    as 4 bytes per pixel, 16-bit grey as 2, 32-bit integer and float as 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_peak_bytes(width: int, height: int, bytes_per_pixel: int) -> int:
    """A bound on the memory ``read_image`` needs for one frame: the decoded frame twice (the
    decoder's output and a copy: orientation, a decompression buffer), the 8-bit result and its RGB
    image (4 bytes per pixel), and the strips converted through floats (a few MiB)."""
    pixels = width * height
    return pixels * (2 * bytes_per_pixel + 5) + 16 * 1024 * 1024


class DamagedDataError(ValueError):
    """The compressed data is damaged (found while checking it, before the decoder sees it)."""


# ----------------------------------------------------------------------------------------------
# Progressive JPEG


# A marker inside entropy-coded data: 0xFF (any fill bytes) then a byte that is neither a stuffed
# zero nor a restart marker (RSTn, D0-D7).
_MARKER_IN_SCAN = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def jpeg_scan_count(data: bytes | memoryview, stop_after: int | None = None) -> int:
    """Number of scans (SOS segments) in a JPEG, by walking its segments without decoding.

    Counting stops once ``stop_after`` is passed (enough to refuse a file). A damaged segment
    structure ends the walk (the decoder reports the damage itself).
    """
    view = memoryview(data)
    size = len(view)
    pos = 2 if bytes(view[:2]) == b"\xff\xd8" else 0
    scans = 0
    while pos + 4 <= size:
        if view[pos] != 0xFF:
            return scans
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return scans
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", view, pos + 2)
        pos += 2 + length
        if marker == 0xDA:
            scans += 1
            if stop_after is not None and scans > stop_after:
                return scans
            found = _MARKER_IN_SCAN.search(view, pos)
            if found is None:
                return scans
            pos = found.end() - 2  # at the 0xFF of the next marker
    return scans


def check_jpeg_scans(data: bytes | memoryview, limit: int = MAX_JPEG_SCANS) -> None:
    """Raise ``DecodeLimitError`` when a (progressive) JPEG has more than ``limit`` scans."""
    scans = jpeg_scan_count(data, stop_after=limit)
    if scans > limit:
        raise DecodeLimitError(
            f"is a progressive JPEG with more than {limit} scans (real encoders write 6 to about 20); "
            "decoding it would take minutes",
            "Re-save it as a baseline (non-progressive) JPEG or as PNG",
        )


def check_decoded_bytes(width: int, height: int, bytes_per_pixel: int, limit: int, what: str = "") -> None:
    """Raise ``DecodeLimitError`` when one decoded frame would take more than ``limit`` bytes."""
    needed = width * height * bytes_per_pixel
    if needed > limit:
        raise DecodeLimitError(
            f"would take {needed / 2**20:,.0f} MiB once decoded ({width}x{height}"
            f"{', ' + what if what else ''}, {bytes_per_pixel} bytes per pixel); the limit is "
            f"{limit / 2**20:,.0f} MiB"
        )


# ----------------------------------------------------------------------------------------------
# Deflated DICOM


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _meta_elements(data: bytes) -> list[tuple[int, int, bytes, int, int]]:
    """The file meta elements (group 0002, explicit VR little endian) after the 132-byte preamble:
    ``(element, start, vr, value_start, value_end)``."""
    out = []
    pos = 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            value_start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_start = pos + 8
        value_end = value_start + length
        if value_end > len(data):
            break
        out.append((elem, pos, vr, value_start, value_end))
        pos = value_end
    return out


def dicom_transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID of a DICOM Part 10 file (from its file meta), or None."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    for elem, _, _, start, end in _meta_elements(data):
        if elem == 0x0010:
            return data[start:end].rstrip(b"\0 ").decode("ascii", "replace")
    return None


def _inflate(stream: memoryview, cap: int, *, prefix: bool) -> bytes:
    """Inflate a raw deflate stream in 1 MiB steps. Past ``cap`` bytes: stop there (``prefix``) or
    raise ``DecodeLimitError``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: bytes | memoryview = stream
    while True:
        room = cap + 1 - len(out)
        if room <= 0:
            if prefix:
                return bytes(out[:cap])
            raise DecodeLimitError(
                f"is a deflated DICOM that inflates to more than {cap / 2**20:,.0f} MiB (the limit for "
                "its size)",
                "Re-export it uncompressed or with an image compression (JPEG, RLE)",
            )
        try:
            piece = inflater.decompress(pending, min(_INFLATE_STEP, room))
        except zlib.error as e:
            if prefix and out:
                return bytes(out)  # the header may still be complete; the full read reports it
            raise DamagedDataError(f"has a damaged deflate stream ({e})") from None
        out += piece
        pending = inflater.unconsumed_tail
        if inflater.eof or (not piece and not pending):
            return bytes(out)


def inflate_dicom(data: bytes, cap: int, *, prefix: bool = False) -> bytes:
    """A deflated DICOM as the equivalent Explicit VR Little Endian file, for pydicom to read.

    The dataset after the file meta is inflated in steps: with ``prefix`` only its first ``cap``
    bytes (enough to read the header with ``stop_before_pixels``); otherwise all of it, raising
    ``DecodeLimitError`` as soon as it passes ``cap`` bytes (``DamagedDataError`` for a broken stream). The file meta is rewritten to name the
    uncompressed transfer syntax (and its group length updated), so pydicom reads it as usual.
    """
    elements = _meta_elements(data)
    if not elements:
        raise DamagedDataError("is a deflated DICOM without readable file meta information")
    meta_end = elements[-1][4]
    inflated = _inflate(memoryview(data)[meta_end:], cap, prefix=prefix)
    new_ts = EXPLICIT_VR_LITTLE_ENDIAN.encode("ascii") + b"\0"  # UIDs pad to even length with NUL
    body = bytearray()
    for elem, start, _vr, _value_start, value_end in elements:
        if elem == 0x0000:
            continue  # group length: recomputed below
        if elem == 0x0010:
            body += data[start : start + 6] + struct.pack("<H", len(new_ts)) + new_ts
        else:
            body += data[start:value_end]
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return data[:132] + group_length + bytes(body) + inflated


__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFLATED_TRANSFER_SYNTAX",
    "MAX_JPEG_SCANS",
    "DamagedDataError",
    "DecodeLimitError",
    "check_decoded_bytes",
    "check_jpeg_scans",
    "decode_peak_bytes",
    "decoded_bytes_per_pixel",
    "dicom_transfer_syntax",
    "inflate_dicom",
    "jpeg_scan_count",
]
