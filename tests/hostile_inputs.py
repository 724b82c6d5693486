"""Hostile inputs, built at run time (no committed binary blobs): each a small file that expands to
far more memory or CPU time than its size suggests. Used by the hostile-input tests and by
``benchmarks/bench_hostile.py``.

Every builder streams what it compresses, so building a bomb costs little memory itself.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int, colour: bool = False) -> bytes:
    """A valid PNG of ``width x height`` black pixels (8-bit grey, or RGB): a few tens of KB for
    tens of megapixels. The rows are compressed one at a time, never held all at once."""
    channels = 3 if colour else 1
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if colour else 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + width * channels)  # filter byte 0, then the samples
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def tiff_16bit(width: int, height: int) -> bytes:
    """A deflate-compressed 16-bit grey TIFF of zeros (about 100 KB for 6000 x 6000)."""
    buf = io.BytesIO()
    Image.new("I;16", (width, height)).save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """``(marker, start, end)`` of each segment of a JPEG, an SOS segment including its entropy-coded
    data (up to the next marker that is not a restart marker or a stuffed 0xFF)."""
    out = []
    pos = 2  # after SOI
    while pos < len(data):
        assert data[pos] == 0xFF, f"no marker at {pos}"
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            out.append((marker, pos, pos + 2))
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        end = pos + 2 + length
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                nxt = data[end + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_jpeg_scan_bomb(side: int = 2048, scans: int = 20_000, colour: bool = False) -> bytes:
    """A progressive JPEG whose last scan (an AC scan of a flat image: one end-of-band run, a few
    bytes) is repeated ``scans`` times. libjpeg processes every scan over the whole image, so decoding
    time grows with ``scans`` x pixels while the file stays ~13 bytes per scan. ``colour``: a
    3-channel file (prepare decodes those to check their colour)."""
    buf = io.BytesIO()
    flat = Image.new("RGB", (side, side), (128, 120, 110)) if colour else Image.new("L", (side, side), 128)
    flat.save(buf, format="JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segments = _jpeg_segments(data)
    sos = [(s, e) for m, s, e in segments if m == 0xDA]
    last_start, last_end = sos[-1]
    scan = data[last_start:last_end]
    return data[:last_end] + scan * max(0, scans - len(sos)) + data[last_end:]


def jpeg_scan_count(data: bytes) -> int:
    """How many scans (SOS segments) a JPEG has, by walking its segments."""
    return sum(1 for m, _, _ in _jpeg_segments(data) if m == 0xDA)


def _explicit_le_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _file_meta(transfer_syntax: str) -> bytes:
    sop = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    body = (
        _explicit_le_element(0x0002, 0x0001, b"OB", b"\0\1")
        + _explicit_le_element(0x0002, 0x0002, b"UI", _text(sop, b"\0"))
        + _explicit_le_element(0x0002, 0x0003, b"UI", _text("1.2.3.4.5.6.7", b"\0"))
        + _explicit_le_element(0x0002, 0x0010, b"UI", _text(transfer_syntax, b"\0"))
    )
    group_length = _explicit_le_element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


def _image_elements(rows: int, cols: int, samples: int, bits: int, photometric: str) -> bytes:
    """The image pixel module (before PixelData), explicit VR little endian, in tag order."""
    out = _explicit_le_element(0x0008, 0x0016, b"UI", _text("1.2.840.10008.5.1.4.1.1.7", b"\0"))
    out += _explicit_le_element(0x0008, 0x0018, b"UI", _text("1.2.3.4.5.6.7", b"\0"))
    out += _explicit_le_element(0x0028, 0x0002, b"US", struct.pack("<H", samples))
    out += _explicit_le_element(0x0028, 0x0004, b"CS", _text(photometric))
    if samples > 1:
        out += _explicit_le_element(0x0028, 0x0006, b"US", struct.pack("<H", 0))
    out += _explicit_le_element(0x0028, 0x0010, b"US", struct.pack("<H", rows))
    out += _explicit_le_element(0x0028, 0x0011, b"US", struct.pack("<H", cols))
    out += _explicit_le_element(0x0028, 0x0100, b"US", struct.pack("<H", bits))
    out += _explicit_le_element(0x0028, 0x0101, b"US", struct.pack("<H", bits))
    out += _explicit_le_element(0x0028, 0x0102, b"US", struct.pack("<H", bits - 1))
    out += _explicit_le_element(0x0028, 0x0103, b"US", struct.pack("<H", 0))
    return out


def deflated_dicom(rows: int = 32_768, cols: int = 32_768, pixel_bytes: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM (1.2.840.10008.1.2.1.99) of ``rows x cols`` 8-bit
    zeros: about 1 MB on disk, ``rows * cols`` bytes once inflated (1 GiB by default), and Rows /
    Columns can only be read after inflating. ``pixel_bytes`` makes the pixel data another size than
    the header says (a file that lies). Compressed in 16 MiB steps."""
    dataset = _image_elements(rows, cols, 1, 8, "MONOCHROME2")
    n = rows * cols if pixel_bytes is None else pixel_bytes
    dataset += struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", n)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(dataset)]
    block = b"\0" * (16 << 20)
    left = n
    while left:
        step = min(left, len(block))
        parts.append(comp.compress(block[:step]))
        left -= step
    parts.append(comp.flush())
    return _file_meta("1.2.840.10008.1.2.1.99") + b"".join(parts)


def _packbits_zeros(n: int) -> bytes:
    """PackBits (DICOM RLE) encoding of ``n`` zero bytes: runs of at most 128."""
    full, rest = divmod(n, 128)
    out = b"\x81\x00" * full  # -127: repeat the next byte 128 times
    if rest:
        out += bytes([(257 - rest) & 0xFF, 0])
    return out


def _encapsulated(frame: bytes) -> bytes:
    """PixelData holding one frame in the encapsulated form (empty basic offset table)."""
    item = b"\xfe\xff\x00\xe0"
    if len(frame) % 2:
        frame += b"\0"
    body = item + struct.pack("<I", 0) + item + struct.pack("<I", len(frame)) + frame
    return (
        struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\0\0"
        + b"\xff\xff\xff\xff"
        + body
        + b"\xfe\xff\xdd\xe0"
        + b"\0\0\0\0"
    )


def rle_colour_dicom(rows: int = 6000, cols: int = 6000) -> bytes:
    """An RLE Lossless, 16-bit, 3-sample (RGB) DICOM of zeros: 6 byte-plane segments, each row a few
    PackBits runs (about 3.4 MB for 6000 x 6000, 216 MB of samples once decoded)."""
    segment = _packbits_zeros(cols) * rows
    n_segments = 6  # 3 samples x 2 bytes
    offsets = [64 + i * len(segment) for i in range(n_segments)]
    header = struct.pack("<I", n_segments) + b"".join(struct.pack("<I", o) for o in offsets)
    header += b"\0" * (64 - len(header))
    frame = header + segment * n_segments
    return (
        _file_meta("1.2.840.10008.1.2.5") + _image_elements(rows, cols, 3, 16, "RGB") + _encapsulated(frame)
    )


def jpeg_in_dicom(jpeg: bytes, rows: int, cols: int) -> bytes:
    """A DICOM (JPEG Baseline transfer syntax) whose one frame is ``jpeg``, e.g. a scan bomb."""
    return (
        _file_meta("1.2.840.10008.1.2.4.50")
        + _image_elements(rows, cols, 1, 8, "MONOCHROME2")
        + _encapsulated(jpeg)
    )


def zip_bomb_csv(uncompressed: int = 1 << 30) -> bytes:
    """A zip holding ``submission.csv`` of ``uncompressed`` bytes of repeated valid rows (~1 MB
    of zip for 1 GiB). Written in 4 MiB steps."""
    buf = io.BytesIO()
    line = b"ImageCLEFmedical_Caption_2025_test_0,an axial CT of the chest\n"
    block = line * ((4 << 20) // len(line))
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("submission.csv", "w", force_zip64=True) as f:
            f.write(b"ID,Caption\n")
            left = uncompressed - 11
            while left > 0:
                chunk = block[: min(left, len(block))]
                f.write(chunk)
                left -= len(chunk)
    return buf.getvalue()


def run_measured(code: str, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh Python process (this checkout's medcap first on the path); it sets
    ``result`` to something JSON can write. Returns ``{"result": ..., "peak_rss_mb": ...}`` with the
    child's own peak resident memory.

    The peak is the child's ``VmHWM`` (the high-water mark of its address space, which starts afresh
    at exec), not ``getrusage(...).ru_maxrss``: Linux carries the parent's high-water mark across
    fork and exec into the child's ``ru_maxrss`` (measured here: every child of a 750 MB pytest
    process reported at least 750 MB), so it cannot bound what the child itself used."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "result = None\n"
        + code
        + "\nhwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
        "print('@@' + json.dumps({'result': result, 'peak_rss_mb': int(hwm.split()[1]) / 1024}))\n"
    )
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
    if done.returncode != 0 or not lines:
        raise AssertionError(
            f"child failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1][2:])
