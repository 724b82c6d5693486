"""Reading ROCOv2-layout datasets and writing prepared manifests (``medcap data prepare|stats``).

Prepared layout (what every later stage reads)::

    PREP/prepare.json                 options used (root, layout, colour policy, limits) and totals
    PREP/{split}/manifest.csv         one row per kept image (columns: MANIFEST_COLUMNS)
    PREP/{split}/skipped.csv          one row per dropped item: id, image, reason, detail
    PREP/{split}/notes.csv            one row per kept item that needed a remark: id, image, note, detail
    PREP/{split}/stats.json           counts (rows in = kept + skipped), policies, modality, lengths
    PREP/plots/*.png                  written by ``medcap data stats``

Input layouts (detected per split, in this order):

* ROCOv2 release and the ImageCLEFmedical 2024 edition (same files, IDs renamed to
  ``ImageCLEFmedical_Caption_2024_valid_000001``): ``ROOT/{split}/<ID>.jpg`` and
  ``ROOT/{split}_captions.csv``, ``{split}_concepts.csv``, ``{split}_concepts_manual.csv``;
  images may also sit in ``ROOT/{split}_images/`` (the name of the release zips).
* ImageCLEFmedical evaluation layout (2025 edition, IDs like ``ImageCLEFmedical_Caption_2025_valid_0``):
  ``ROOT/{split}/captions.csv``, ``ROOT/{split}/images/<ID>.jpg``, ``ROOT/{split}/concepts.csv``,
  ``ROOT/{split}/concepts_manual.csv``.
* ImageCLEFmedical 2023 edition: ``ROOT/ImageCLEFmedical_Caption_2023_caption_prediction_{split}_labels.csv``
  and ``..._concept_detection_{split}_labels.csv`` (tab separated), images in ``ROOT/{split}/`` or
  a shared ``ROOT/images/``.
* A user's own data: ``--images DIR --captions CSV`` (a folder of images and a CSV of ``ID,Caption``;
  the ID may carry the file extension or not).

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
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageChops, ImageFile, UnidentifiedImageError

ColorPolicy = Literal["stored-rgb", "true-color", "all"]
COLOR_POLICIES: tuple[str, ...] = ("stored-rgb", "true-color", "all")

MANIFEST_COLUMNS = [
    "id",  # image ID, e.g. ROCOv2_2023_train_000001
    "image",  # absolute path of the image file
    "caption_raw",  # caption exactly as in the CSV
    "caption",  # cleaned caption (Unicode whitespace stripped, internal runs collapsed)
    "cuis",  # CUIs joined by ';' (from {split}_concepts.csv; empty if none)
    "modality",  # from {split}_concepts_manual.csv: ct, xray, mri, ultrasound, angiography, pet, other, unknown
    "width",
    "height",
    "mode",  # Pillow mode as stored: RGB, L, CMYK, ...
    "true_color",  # 1 if the channels really differ (beyond JPEG noise), 0 if not, empty if not checked
]
SKIPPED_COLUMNS = ["id", "image", "reason", "detail"]
NOTES_COLUMNS = ["id", "image", "note", "detail"]

# Modality from the manually checked concepts (ROCOv2 `concepts_manual`): one CUI per image.
MODALITY_CUIS: dict[str, str] = {
    "C0040405": "ct",  # X-Ray Computed Tomography
    "C1306645": "xray",  # Plain x-ray
    "C0024485": "mri",  # Magnetic Resonance Imaging
    "C0041618": "ultrasound",  # Ultrasonography
    "C0002978": "angiography",  # angiogram
    "C0032743": "pet",  # Positron-Emission Tomography
}
MODALITIES = [*MODALITY_CUIS.values(), "other", "unknown"]

# Why an item was dropped. Every skipped.csv row carries one of these, with a detail.
SKIP_REASONS: dict[str, str] = {
    "malformed_row": "the CSV record has no ID or no caption field",
    "duplicate_id": "the ID appeared earlier in the captions CSV (the first row is kept)",
    "missing_image": "a caption row whose image file is not in the image folder",
    "no_caption": "an image file with no row in the captions CSV",
    "empty_caption": "the caption is empty after stripping whitespace",
    "empty_file": "the image file has zero bytes",
    "truncated": "the image file ends early (download or copy cut short)",
    "corrupt": "the image file is damaged and cannot be decoded",
    "unreadable": "not an image format Pillow can read",
    "too_many_pixels": "width x height over the pixel limit (decompression-bomb guard)",
    "color_policy": "the image does not pass the chosen colour policy",
}

# Remarks on kept items (notes.csv): kept, but a person may want to know.
NOTE_KINDS: dict[str, str] = {
    "format_mismatch": "the file's content is another format than its extension says (read by content)",
    "decode_replaced": "the CSV row held bytes that are not valid in the encoding; replaced by U+FFFD",
    "image_warning": "Pillow warned while reading the file",
    "duplicate_image_name": "several files share this ID's stem; the one listed was used",
}

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
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
_SIGNATURES = [
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"RIFF", "WEBP"),
]
_SINGLE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
# Zero-width format characters (Unicode Cf) seen in real captions; invisible, so removed.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"), None)

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own Image.MAX_IMAGE_PIXELS default (~ 9459 x 9459)


class LayoutError(ValueError):
    """The dataset folder does not have the expected files; the message names them."""


class CsvError(ValueError):
    """A CSV file cannot be read; the message names the file, the line and what to do."""


@dataclass
class ManifestRow:
    """One kept image of a prepared split."""

    id: str
    image: str
    caption_raw: str
    caption: str
    cuis: list[str] = field(default_factory=list)
    modality: str = "unknown"
    width: int = 0
    height: int = 0
    mode: str = ""
    true_color: bool | None = False
    """True/False from the colour check; None where prepare ran without it (stored-rgb fast path)."""


@dataclass
class DataConfig:
    """Where training and evaluation read their prepared data."""

    prepared: Path = Path("runs/demo/prepared")
    """Folder written by ``medcap data prepare`` (holds one sub-folder per split)."""
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    max_train_samples: int | None = None
    """Use only the first N training rows (quick runs, dry runs)."""
    max_eval_samples: int | None = None
    """Use only the first N validation/test rows."""
    num_workers: int = 2
    """DataLoader worker processes for decoding images."""

    def manifest(self, split: str) -> Path:
        return Path(self.prepared) / split / "manifest.csv"


# ----------------------------------------------------------------------------------------------
# Reading manifests and images (used by training, captioning, evaluation)
# ----------------------------------------------------------------------------------------------


def read_manifest(path: str | Path, limit: int | None = None) -> list[ManifestRow]:
    """Read a prepared ``manifest.csv``; ``limit`` keeps the first N rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run 'medcap data prepare ROOT --out DIR' first, "
            "and point data.prepared at DIR"
        )
    rows: list[ManifestRow] = []
    with path.open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            tc = (rec.get("true_color") or "").strip()
            rows.append(
                ManifestRow(
                    id=rec["id"],
                    image=rec["image"],
                    caption_raw=rec["caption_raw"],
                    caption=rec["caption"],
                    cuis=[c for c in (rec.get("cuis") or "").split(";") if c],
                    modality=rec.get("modality", "unknown") or "unknown",
                    width=int(rec.get("width") or 0),
                    height=int(rec.get("height") or 0),
                    mode=rec.get("mode", ""),
                    true_color=None if tc == "" else tc in ("1", "True", "true"),
                )
            )
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _flatten_alpha(im: Image.Image, mode: str) -> Image.Image:
    """Composite an image with alpha onto black: radiographs have black backgrounds, and the
    colour under fully transparent pixels is arbitrary, so it must not leak into the picture."""
    base = Image.new(mode, im.size, 0)
    base.paste(im.convert(mode), mask=im.getchannel("A"))
    return base


def load_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Open an image file as 3-channel RGB.

    Conversions: L, 1 -> grey copied to 3 channels; LA, RGBA, PA and palettes with transparency
    -> composited onto black; P -> its palette colours; CMYK (Adobe-inverted too) and YCbCr ->
    RGB; 16-bit and 32-bit grey (I;16, I, F) -> scaled to 8 bits by the image's own min..max
    (the stored range of medical 16-bit images is arbitrary), then grey to RGB. The format is
    taken from the content, not the extension.

    ``min_size`` (default ``None``: full-size decode, as before): for JPEGs, let the decoder scale
    by 1/2, 1/4 or 1/8 while decoding (Pillow's draft mode), choosing the largest reduction that keeps
    BOTH sides at ``min_size`` pixels or more (a JPEG already smaller is decoded as it is). Pass the
    model's input size (224, or ``model.image_size``): the processor resizes to it anyway, and
    decoding a ROCOv2-sized JPEG this way takes about half the CPU time. Other formats ignore it.
    """
    if min_size is not None and (not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"load_image: min_size must be a positive integer or None, got {min_size!r}")
    with Image.open(path) as im:
        if min_size is not None and im.format == "JPEG":
            # Mode "RGB" changes no colour handling here (Pillow only converts when L or YCbCr is
            # asked for); only the DCT scale is set. Both sides stay >= min_size.
            im.draft("RGB", (min_size, min_size))
        im.load()
        mode = im.mode
        if mode == "RGB":
            return im.copy()
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            import numpy as np

            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
            return Image.fromarray(np.rint(a).astype("uint8"), "L").convert("RGB")
        if mode == "P" and "transparency" in im.info:
            return _flatten_alpha(im.convert("RGBA"), "RGB")
        if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
            return _flatten_alpha(im.convert("RGBA") if mode != "LA" else im, "RGB")
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Captions and CSV files
# ----------------------------------------------------------------------------------------------


def clean_caption(text: str) -> str:
    """Strip Unicode whitespace at both ends, drop zero-width characters, collapse internal runs of
    whitespace (including no-break and thin spaces, tabs and newlines) to one space."""
    return " ".join(text.translate(_ZERO_WIDTH).split())


@dataclass
class CsvRecord:
    """One data record of a CSV: its fields and the physical line where it starts (1-based)."""

    line: int
    fields: list[str]
    replaced: bool = False
    """True when undecodable bytes in this record were replaced (``encoding_errors='replace'``)."""


@dataclass
class CsvTable:
    """A parsed CSV: column positions, records, and what was noticed while reading it."""

    path: Path
    header: list[str] | None
    records: list[CsvRecord]
    delimiter: str
    had_bom: bool = False
    replaced_bytes: int = 0


def read_csv_table(
    path: Path,
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
) -> CsvTable:
    """Read a CSV (or TSV) file fully, handling a UTF-8 BOM, quoted commas and newlines.

    Bytes that are not valid in ``encoding`` raise ``CsvError`` naming the file, line and bytes
    (``strict``), or are replaced by U+FFFD and the affected records flagged (``replace``).
    The delimiter is a comma, unless the first line has none: then a tab (2023 edition) or a semicolon.
    """
    data = path.read_bytes()
    had_bom = data.startswith(codecs.BOM_UTF8)
    if had_bom and encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig"):
        data = data[len(codecs.BOM_UTF8) :]
    bad_spans: list[tuple[int, int]] = []
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        if encoding_errors != "replace":
            line = data.count(b"\n", 0, e.start) + 1
            raise CsvError(
                f"{path}, line {line}: bytes {data[e.start : e.end]!r} are not valid {encoding}. "
                "Re-save the file as UTF-8, or pass --encoding with its real encoding (e.g. cp1252), "
                "or --encoding-errors replace to replace undecodable bytes with U+FFFD "
                "(the rows affected are counted in stats.json and listed in notes.csv)."
            ) from None
        pieces: list[str] = []
        pos = 0
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        # Decode piecewise so every bad byte span is known (to flag exactly the rows it hit).
        while pos < len(data):
            try:
                pieces.append(decoder.decode(data[pos:], final=True))
                break
            except UnicodeDecodeError as e:
                start = pos + e.start
                end = pos + e.end
                pieces.append(data[pos:start].decode(encoding, errors="strict"))
                pieces.append("\ufffd")
                bad_spans.append((start, end))
                pos = end
                decoder.reset()
        text = "".join(pieces)
    bad_lines = {data.count(b"\n", 0, s) + 1 for s, _ in bad_spans}

    first_line = text.split("\n", 1)[0]
    delimiter = ","
    if "," not in first_line:  # a 2023-edition TSV, or a spreadsheet export with semicolons
        delimiter = "\t" if "\t" in first_line else (";" if ";" in first_line else ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[CsvRecord] = []
    prev_end = 0
    try:
        for fields in reader:
            start, end = prev_end + 1, reader.line_num
            prev_end = end
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            hit = any(start <= ln <= end for ln in bad_lines) if bad_lines else False
            records.append(CsvRecord(line=start, fields=fields, replaced=hit))
    except csv.Error as e:
        raise CsvError(
            f"{path}, line {reader.line_num}: {e}. Check the quoting near that line "
            "(a field that holds commas, quotes or newlines must be enclosed in double quotes)."
        ) from None
    return CsvTable(
        path=path,
        header=None,
        records=records,
        delimiter=delimiter,
        had_bom=had_bom,
        replaced_bytes=sum(e - s for s, e in bad_spans),
    )


_ID_NAMES = {"id", "image", "image_id", "imageid", "filename", "file", "name"}
_CAPTION_NAMES = {"caption", "captions", "text", "description"}
_CUIS_NAMES = {"cuis", "cui", "concepts", "concept", "labels"}


def _split_header(table: CsvTable, value_names: set[str], what: str) -> tuple[int, int, bool]:
    """Find the ID and value columns from the header; a headerless 2-column file is read as
    ``ID,value`` (returns ``headerless=True``)."""
    if not table.records:
        return 0, 1, False
    first = [f.strip().lower() for f in table.records[0].fields]
    id_col = next((i for i, f in enumerate(first) if f in _ID_NAMES), None)
    val_col = next((i for i, f in enumerate(first) if f in value_names), None)
    if id_col is not None and val_col is not None:
        table.header = table.records.pop(0).fields
        return id_col, val_col, False
    if len(first) == 2 and id_col is None and val_col is None:
        return 0, 1, True
    raise CsvError(
        f"{table.path}, line {table.records[0].line}: header {table.records[0].fields!r} has no "
        f"ID and {what} columns. Expected a header like 'ID,{what}' "
        f"(names accepted: ID: {sorted(_ID_NAMES)}, {what}: {sorted(value_names)})."
    )


@dataclass
class CaptionRow:
    """A caption record as read, before any check."""

    line: int
    id: str
    caption_raw: str | None
    replaced: bool = False


def read_captions(
    path: Path, encoding: str = "utf-8", encoding_errors: Literal["strict", "replace"] = "strict"
) -> tuple[list[CaptionRow], dict[str, Any]]:
    """Read a captions CSV (``ID,Caption``) into rows in file order, and facts about the file."""
    table = read_csv_table(path, encoding, encoding_errors)
    id_col, cap_col, headerless = _split_header(table, _CAPTION_NAMES, "Caption")
    n_fields = len(table.header) if table.header else 2
    rows: list[CaptionRow] = []
    for rec in table.records:
        f = rec.fields
        rid = f[id_col].strip() if len(f) > id_col else ""
        # Extra fields (an unquoted comma) are not guessed at: the row is reported as malformed.
        cap = f[cap_col] if len(f) == n_fields else None
        rows.append(CaptionRow(line=rec.line, id=rid, caption_raw=cap, replaced=rec.replaced))
    facts = {
        "file": str(path),
        "bom": table.had_bom,
        "delimiter": table.delimiter,
        "headerless": headerless,
        "records": len(rows),
        "replaced_bytes": table.replaced_bytes,
        "records_with_replaced_bytes": sum(r.replaced for r in rows),
    }
    return rows, facts


def read_concepts(
    path: Path | None, encoding: str = "utf-8", encoding_errors: Literal["strict", "replace"] = "strict"
) -> tuple[dict[str, list[str]] | None, dict[str, Any]]:
    """Read a concepts CSV (``ID,CUIs`` with CUIs joined by ';'); ``None`` when the file is absent."""
    if path is None or not path.is_file():
        return None, {"file": str(path) if path else None, "present": False}
    table = read_csv_table(path, encoding, encoding_errors)
    id_col, val_col, headerless = _split_header(table, _CUIS_NAMES, "CUIs")
    out: dict[str, list[str]] = {}
    dups = 0
    for rec in table.records:
        f = rec.fields
        rid = f[id_col].strip() if len(f) > id_col else ""
        if not rid:
            continue
        if rid in out:
            dups += 1
            continue
        raw = f[val_col] if len(f) > val_col else ""
        out[rid] = [c.strip() for c in raw.replace(",", ";").split(";") if c.strip()]
    return out, {
        "file": str(path),
        "present": True,
        "records": len(table.records),
        "duplicate_ids": dups,
        "bom": table.had_bom,
        "headerless": headerless,
    }


def modality_from_cuis(cuis: Sequence[str] | None) -> str:
    """The imaging modality named by the manual concepts; ``unknown`` without concepts, ``other``
    when concepts exist but name none of the six modalities."""
    if cuis is None:
        return "unknown"
    for c in cuis:
        m = MODALITY_CUIS.get(c)
        if m:
            return m
    return "other"


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


@dataclass
class SplitSource:
    """Where one split's files are."""

    name: str
    captions: Path
    images: Path
    concepts: Path | None
    concepts_manual: Path | None
    layout: str
    images_shared: bool = False
    """True when the image folder holds several splits (2023 ``images/``): no orphan check then."""


EXPECTED_LAYOUT = """Expected one of these layouts:
  ROCOv2 release (also the ImageCLEFmedical 2024 edition):
    ROOT/{split}/<ID>.jpg   (or ROOT/{split}_images/<ID>.jpg)
    ROOT/{split}_captions.csv            ID,Caption
    ROOT/{split}_concepts.csv            ID,CUIs        (optional)
    ROOT/{split}_concepts_manual.csv     ID,CUIs        (optional; gives the modality)
  ImageCLEFmedical evaluation layout (2025 edition):
    ROOT/{split}/images/<ID>.jpg, ROOT/{split}/captions.csv, ROOT/{split}/concepts.csv, ROOT/{split}/concepts_manual.csv
  ImageCLEFmedical 2023 edition:
    ROOT/{split}/<ID>.jpg, ROOT/ImageCLEFmedical_Caption_2023_caption_prediction_{split}_labels.csv
  Your own data: medcap data prepare --images DIR --captions CSV [--concepts CSV] [--split-name NAME]"""


def _first_existing(paths: Sequence[Path], want_dir: bool = False) -> Path | None:
    for p in paths:
        if p.is_dir() if want_dir else p.is_file():
            return p
    return None


def _caption_candidates(root: Path, split: str) -> list[Path]:
    cands = [root / f"{split}_captions.csv", root / split / "captions.csv"]
    cands += sorted(root.glob(f"*caption_prediction_{split}_labels.csv"))
    cands += sorted(root.glob(f"*caption_prediction_{split}.csv"))
    return cands


def resolve_split(root: Path, split: str) -> SplitSource:
    """Find one split's captions, images and concepts under ``root``; ``LayoutError`` if the
    captions CSV or the image folder is missing (naming what was looked for)."""
    cands = _caption_candidates(root, split)
    captions = _first_existing(cands)
    if captions is None:
        looked = "\n".join(f"    {p}" for p in cands[:2]) + (
            f"\n    {root}/*caption_prediction_{split}_labels.csv"
        )
        raise LayoutError(
            f"missing captions file for split '{split}': {root / f'{split}_captions.csv'} does not exist.\n"
            f"  Looked for:\n{looked}\n"
            f"  (If this split has no captions, leave it out with --splits, e.g. --splits train,valid.)\n"
            f"{EXPECTED_LAYOUT}"
        )
    if captions.parent == root / split:  # evaluation layout: everything inside the split folder
        layout = "imageclef-split-folder"
        images = _first_existing([root / split / "images", root / split], want_dir=True)
        concepts = _first_existing([root / split / "concepts.csv"])
        manual = _first_existing([root / split / "concepts_manual.csv"])
        shared = False
    elif "caption_prediction" in captions.name:
        layout = "imageclef-2023"
        images = _first_existing([root / split, root / f"{split}_images", root / "images"], want_dir=True)
        concepts = _first_existing(
            sorted(root.glob(f"*concept_detection_{split}_labels.csv"))
            + sorted(root.glob(f"*concept_detection_{split}.csv"))
        )
        manual = _first_existing([root / f"{split}_concepts_manual.csv"])
        shared = images is not None and images.name == "images"
    else:
        layout = "rocov2-release"
        images = _first_existing(
            [root / split, root / f"{split}_images", root / f"{split}_images" / split], want_dir=True
        )
        # Some archives unpack as {split}_images/{split}/...: use the inner folder when it holds the files.
        if images is not None and images.name == f"{split}_images" and (images / split).is_dir():
            images = images / split
        concepts = _first_existing([root / f"{split}_concepts.csv"])
        manual = _first_existing([root / f"{split}_concepts_manual.csv"])
        shared = False
    if images is None:
        raise LayoutError(
            f"missing image folder for split '{split}': found {captions} but no {root / split}/ "
            f"(nor {root / f'{split}_images'}/, {root / split / 'images'}/).\n{EXPECTED_LAYOUT}"
        )
    return SplitSource(split, captions, images, concepts, manual, layout, shared)


def detect_splits(root: Path) -> list[str]:
    """The standard splits (train, valid, test) that have a captions file or an image folder."""
    found = []
    for split in ("train", "valid", "test"):
        if _first_existing(_caption_candidates(root, split)) or (root / split).is_dir():
            found.append(split)
    return found


def id_scheme(ids: Sequence[str]) -> str:
    """Name the ID convention of a split: ROCOv2, an ImageCLEFmedical edition, or other."""
    import re

    sample = [i for i in ids[:200] if i]
    if not sample:
        return "none"
    pats = {
        "rocov2": r"^ROCOv2_\d{4}_(train|valid|test)_\d+$",
        "imageclefmedical-2024": r"^ImageCLEFmedical_Caption_2024_(train|valid|test)_\d{6}$",
        "imageclefmedical-2025": r"^ImageCLEFmedical_Caption_2025_(train|valid|test)_\d+$",
        "imageclefmedical": r"^ImageCLEFmedical_Caption_\d{4}_(train|valid|test)_\d+$",
    }
    for name, pat in pats.items():
        if all(re.match(pat, i) for i in sample):
            return name
    return "other"


class ImageIndex:
    """File names of an image folder, to match caption IDs with or without an extension."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: dict[str, str] = {}
        self.by_stem: dict[str, list[str]] = {}
        self.ignored: list[str] = []
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.is_file():
                    continue
                name = entry.name
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    self.ignored.append(name)
                    continue
                self.by_name[name] = name
                self.by_stem.setdefault(stem, []).append(name)

    def find(self, image_id: str) -> tuple[str | None, list[str]]:
        """The file for ``image_id`` (exact name first, then ``<ID>.<ext>``, .jpg preferred), and
        the other candidates when several files share the stem."""
        if image_id in self.by_name:
            return image_id, []
        names = self.by_stem.get(image_id)
        if not names:
            return None, []
        if len(names) == 1:
            return names[0], []
        order = sorted(names, key=lambda n: (os.path.splitext(n)[1].lower() not in (".jpg", ".jpeg"), n))
        return order[0], order[1:]


# ----------------------------------------------------------------------------------------------
# Inspecting one image (runs in worker processes)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InspectOptions:
    """What to check for each image."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels (width x height, from the header) are skipped as decompression bombs."""
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
            kind = next((k for sig, k in _SIGNATURES if head.startswith(sig)), None)
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
            kind = next((k for sig, k in _SIGNATURES if head.startswith(sig)), "image")
            info.reason, info.detail = "corrupt", f"damaged {kind} header ({type(e).__name__}: {e})"
            return info
        with im:
            info.width, info.height = im.size
            info.mode, info.format = im.mode, im.format or ""
            if info.width <= 0 or info.height <= 0:
                info.reason, info.detail = "corrupt", f"header gives size {im.size}"
                return info
            pixels = info.width * info.height
            if pixels > opts.max_pixels:
                info.reason = "too_many_pixels"
                info.detail = f"{info.width} x {info.height} = {pixels:,} pixels > limit {opts.max_pixels:,}"
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


# ----------------------------------------------------------------------------------------------
# Preparing a split
# ----------------------------------------------------------------------------------------------


def _percentiles(values: Sequence[float], qs: Sequence[int] = (10, 25, 50, 75, 90, 99)) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {"min": float(a.min()), "mean": round(float(a.mean()), 3)}
    out.update({f"p{q}": float(np.percentile(a, q)) for q in qs})
    out["max"] = float(a.max())
    return out


def _write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def prepare_split(
    source: SplitSource,
    out_dir: Path,
    *,
    color_policy: ColorPolicy = "stored-rgb",
    opts: InspectOptions | None = None,
    workers: int = 2,
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
    progress: bool = True,
) -> dict[str, Any]:
    """Check one split and write ``manifest.csv``, ``skipped.csv``, ``notes.csv`` and
    ``stats.json`` into ``out_dir``; returns the stats. Rows in = kept + skipped, always."""
    opts = opts or InspectOptions()
    t0 = time.perf_counter()
    captions, cap_facts = read_captions(source.captions, encoding, encoding_errors)
    concepts, con_facts = read_concepts(source.concepts, encoding, encoding_errors)
    manual, man_facts = read_concepts(source.concepts_manual, encoding, encoding_errors)
    index = ImageIndex(source.images)
    img_dir = str(source.images.resolve())  # resolved once: per-file resolve() costs syscalls

    skipped: list[list[Any]] = []
    notes: list[list[Any]] = []
    first_line: dict[str, int] = {}
    used_files: set[str] = set()
    pending: list[tuple[CaptionRow, str, str]] = []  # (row, image path, cleaned caption)

    for row in captions:
        if not row.id or row.caption_raw is None:
            what = "no ID" if not row.id else "wrong number of fields (an unquoted comma?)"
            # The row's image (if any) is accounted for by this row, not reported again as an orphan.
            name, others = index.find(row.id) if row.id else (None, [])
            used_files.update([name, *others] if name else [])
            img = os.path.join(img_dir, name) if name else ""
            skipped.append([row.id, img, "malformed_row", f"{source.captions.name} line {row.line}: {what}"])
            continue
        if row.id in first_line:
            skipped.append(
                [
                    row.id,
                    "",
                    "duplicate_id",
                    f"{source.captions.name} line {row.line} repeats the ID of line {first_line[row.id]}",
                ]
            )
            continue
        first_line[row.id] = row.line
        name, others = index.find(row.id)
        if name is None:
            skipped.append(
                [
                    row.id,
                    str(source.images / f"{row.id}.jpg"),
                    "missing_image",
                    f"no file for this ID in {source.images}",
                ]
            )
            continue
        used_files.add(name)
        used_files.update(others)
        img_path = os.path.join(img_dir, name)
        caption = clean_caption(row.caption_raw)
        if not caption:
            skipped.append(
                [row.id, img_path, "empty_caption", f"line {row.line}: raw caption {row.caption_raw!r}"]
            )
            continue
        if others:
            notes.append([row.id, img_path, "duplicate_image_name", f"also present: {', '.join(others)}"])
        if row.replaced:
            notes.append([row.id, img_path, "decode_replaced", f"{source.captions.name} line {row.line}"])
        pending.append((row, img_path, caption))

    orphans: list[str] = []
    if not source.images_shared:
        orphans = sorted(n for n in index.by_name if n not in used_files)
    for name in orphans:
        skipped.append(
            [
                os.path.splitext(name)[0],
                os.path.join(img_dir, name),
                "no_caption",
                f"no row in {source.captions.name}",
            ]
        )

    infos = inspect_many(
        [p for _, p, _ in pending], opts, workers=workers, desc=f"{source.name}: images", progress=progress
    )

    kept: list[list[Any]] = []
    eligible: list[ImageInfo] = []
    modality_counts: Counter[str] = Counter()
    mode_counts: Counter[str] = Counter()
    format_counts: Counter[str] = Counter()
    caption_words: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    for (row, img_path, caption), info in zip(pending, infos, strict=True):
        if not info.ok:
            skipped.append([row.id, img_path, info.reason, info.detail])
            continue
        eligible.append(info)
        mode_counts[info.mode] += 1
        format_counts[info.format] += 1
        for kind, detail in info.notes:
            notes.append([row.id, img_path, kind, detail])
        if not _policy_keeps(color_policy, info):
            skipped.append([row.id, img_path, "color_policy", _policy_detail(color_policy, info, opts)])
            continue
        cuis = concepts.get(row.id, []) if concepts is not None else []
        modality = modality_from_cuis(manual.get(row.id) if manual is not None else None)
        modality_counts[modality] += 1
        caption_words.append(len(caption.split()))
        widths.append(info.width)
        heights.append(info.height)
        tc = "" if info.true_color is None else int(info.true_color)
        kept.append(
            [
                row.id,
                img_path,
                row.caption_raw,
                caption,
                ";".join(cuis),
                modality,
                info.width,
                info.height,
                info.mode,
                tc,
            ]
        )

    rows_in = len(captions) + len(orphans)
    if rows_in != len(kept) + len(skipped):  # an accounting bug must never pass silently
        raise AssertionError(
            f"split {source.name}: rows in {rows_in} != kept {len(kept)} + skipped {len(skipped)}"
        )

    checked = [i for i in eligible if i.true_color is not None]
    color_checked = opts.check_color
    stats: dict[str, Any] = {
        "split": source.name,
        "layout": source.layout,
        "id_scheme": id_scheme([r.id for r in captions]),
        "sources": {
            "captions": cap_facts,
            "concepts": con_facts,
            "concepts_manual": man_facts,
            "images": str(source.images.resolve()),
            "image_files": len(index.by_name),
            "ignored_files": len(index.ignored),
            "orphan_check": not source.images_shared,
        },
        "rows_in": rows_in,
        "caption_rows": len(captions),
        "orphan_images": len(orphans),
        "kept": len(kept),
        "skipped": len(skipped),
        "reconciled": rows_in == len(kept) + len(skipped),
        "skipped_by_reason": dict(Counter(r[2] for r in skipped).most_common()),
        "notes_by_kind": dict(Counter(n[2] for n in notes).most_common()),
        "color_policy": color_policy,
        "color_check": {
            "checked": color_checked,
            "threshold": opts.color_threshold,
            "fraction": opts.color_fraction,
        },
        # Among images that pass every other check: how many each policy would keep.
        "policy_counts": {
            "stored-rgb": sum(i.mode == "RGB" for i in eligible),
            "true-color": sum(bool(i.true_color) for i in eligible) if color_checked else None,
            "all": len(eligible),
        },
        "color": {
            "images_checked": len(checked),
            "true_color": sum(bool(i.true_color) for i in checked),
            "grey_stored_as_rgb": sum(i.mode == "RGB" and i.true_color is False for i in checked),
            "grey_with_color_marks": sum(
                (i.true_color is False) and (i.color_fraction or 0.0) > 0.0 for i in checked
            ),
        },
        "stored_modes": dict(mode_counts.most_common()),
        "formats": dict(format_counts.most_common()),
        "modality": {m: modality_counts.get(m, 0) for m in MODALITIES},
        "caption_words": _percentiles(caption_words),
        "width": _percentiles(widths),
        "height": _percentiles(heights),
        "seconds": round(time.perf_counter() - t0, 3),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, kept)
    _write_csv(out_dir / "skipped.csv", SKIPPED_COLUMNS, skipped)
    _write_csv(out_dir / "notes.csv", NOTES_COLUMNS, notes)
    _write_json(out_dir / "stats.json", stats)
    return stats


def prepare_dataset(
    root: str | Path | None,
    out: str | Path,
    *,
    splits: Sequence[str] | None = None,
    color_policy: ColorPolicy = "stored-rgb",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    check_color: bool | None = None,
    verify_decode: bool = False,
    color_threshold: int = 24,
    color_fraction: float = 0.01,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    concepts: str | Path | None = None,
    concepts_manual: str | Path | None = None,
    split_name: str = "data",
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Prepare a dataset: check every split, write manifests, and return ``{split: stats}``.

    ``root`` holds a ROCOv2/ImageCLEFmedical layout (see the module docstring); or pass ``images``
    and ``captions`` (and optionally ``concepts``/``concepts_manual``) for a user's own folder,
    which becomes the split ``split_name``. ``splits`` defaults to those of train/valid/test
    present under ``root``. Every split's files are located before any work starts, so a missing
    captions CSV stops the run at once (``LayoutError``). ``check_color`` defaults to on for the
    true-color and all policies and off for stored-rgb (then only headers are read: the fast
    path, and the manifest's true_color column is empty).
    """
    if color_policy not in COLOR_POLICIES:
        raise ValueError(f"color_policy {color_policy!r} is not one of {', '.join(COLOR_POLICIES)}")
    if check_color is None:
        check_color = color_policy != "stored-rgb"
    if color_policy == "true-color" and not check_color:
        raise ValueError("color_policy 'true-color' needs the colour check (check_color=True)")
    out = Path(out)
    t0 = time.perf_counter()

    sources: list[SplitSource] = []
    if images is not None or captions is not None:
        if images is None or captions is None:
            raise LayoutError("a user's own data needs both --images DIR and --captions CSV")
        images, captions = Path(images), Path(captions)
        if not captions.is_file():
            raise LayoutError(
                f"missing captions file: {captions} does not exist.\n"
                "  Expected a CSV with a header 'ID,Caption' and one row per image in "
                f"{images}/ (the ID is the file name, with or without its extension)."
            )
        if not images.is_dir():
            raise LayoutError(f"missing image folder: {images} is not a folder.\n{EXPECTED_LAYOUT}")
        sources.append(
            SplitSource(
                split_name,
                captions,
                images,
                Path(concepts) if concepts else None,
                Path(concepts_manual) if concepts_manual else None,
                "plain",
            )
        )
        root_s = None
    else:
        if root is None:
            raise LayoutError(
                f"no dataset given: pass ROOT, or --images DIR --captions CSV.\n{EXPECTED_LAYOUT}"
            )
        root_p = Path(root)
        if not root_p.is_dir():
            raise LayoutError(f"dataset folder {root_p} does not exist.\n{EXPECTED_LAYOUT}")
        wanted = list(splits) if splits else detect_splits(root_p)
        if not wanted:
            raise LayoutError(
                f"no split found in {root_p}: missing {root_p / 'train_captions.csv'} "
                f"(and the valid and test ones).\n{EXPECTED_LAYOUT}"
            )
        sources = [resolve_split(root_p, s) for s in wanted]  # all located before any work
        root_s = str(root_p.resolve())

    opts = InspectOptions(
        max_pixels=max_pixels,
        check_color=check_color,
        verify_decode=verify_decode,
        color_threshold=color_threshold,
        color_fraction=color_fraction,
    )
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for src in sources:
        results[src.name] = prepare_split(
            src,
            out / src.name,
            color_policy=color_policy,
            opts=opts,
            workers=workers,
            encoding=encoding,
            encoding_errors=encoding_errors,
            progress=progress,
        )

    from medcap import __version__

    summary = {
        "medcap_version": __version__,
        "root": root_s,
        "out": str(out.resolve()),
        "layouts": {s.name: s.layout for s in sources},
        "color_policy": color_policy,
        "options": {
            **asdict(opts),
            "workers": workers,
            "encoding": encoding,
            "encoding_errors": encoding_errors,
        },
        "splits": {
            name: {
                k: st[k]
                for k in ("rows_in", "kept", "skipped", "reconciled", "skipped_by_reason", "id_scheme")
            }
            for name, st in results.items()
        },
        "totals": {k: sum(st[k] for st in results.values()) for k in ("rows_in", "kept", "skipped")},
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(out / "prepare.json", summary)
    return results


def cli_prepare(argv: list[str]) -> int:
    """``medcap data prepare ROOT --out DIR``: check a dataset and write manifests."""
    p = argparse.ArgumentParser(
        prog="medcap data prepare",
        description="Check a ROCOv2-layout dataset (or a folder of images + a CSV of ID,Caption) and "
        "write per-split manifests, skipped tables and stats.",
        epilog=EXPECTED_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", nargs="?", help="dataset folder in a ROCOv2/ImageCLEFmedical layout")
    p.add_argument("--out", required=True, help="output folder for the prepared data")
    p.add_argument("--splits", help="comma-separated splits (default: those of train,valid,test present)")
    p.add_argument(
        "--color-policy", choices=COLOR_POLICIES, default="stored-rgb", help="which images to keep"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this (default {DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument("--workers", type=int, default=2, help="processes inspecting images (default 2)")
    p.add_argument(
        "--check-color",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure true colour (default: on for true-color and all, off for stored-rgb)",
    )
    p.add_argument(
        "--verify-decode",
        action="store_true",
        help="decode every image at 1/8 scale to catch damage inside the data (slower)",
    )
    p.add_argument("--color-threshold", type=int, default=24, help="channel difference that counts as colour")
    p.add_argument(
        "--color-fraction", type=float, default=0.01, help="share of coloured pixels for true colour"
    )
    p.add_argument("--images", help="your own data: folder of images")
    p.add_argument("--captions", help="your own data: CSV of ID,Caption")
    p.add_argument("--concepts", help="your own data: CSV of ID,CUIs (optional)")
    p.add_argument("--concepts-manual", help="your own data: CSV of ID,CUIs giving the modality (optional)")
    p.add_argument("--split-name", default="data", help="split name for your own data (default: data)")
    p.add_argument("--encoding", default="utf-8", help="encoding of the CSV files (default utf-8)")
    p.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="strict: stop at undecodable bytes; replace: use U+FFFD and count the rows",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        results = prepare_dataset(
            a.root,
            a.out,
            splits=[s.strip() for s in a.splits.split(",") if s.strip()] if a.splits else None,
            color_policy=a.color_policy,
            max_pixels=a.max_pixels,
            workers=a.workers,
            check_color=a.check_color,
            verify_decode=a.verify_decode,
            color_threshold=a.color_threshold,
            color_fraction=a.color_fraction,
            images=a.images,
            captions=a.captions,
            concepts=a.concepts,
            concepts_manual=a.concepts_manual,
            split_name=a.split_name,
            encoding=a.encoding,
            encoding_errors=a.encoding_errors,
            progress=not a.no_progress,
        )
    except (LayoutError, CsvError, ValueError) as e:
        print(f"medcap data prepare: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an output folder that cannot be written
        print(f"medcap data prepare: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    for name, st in results.items():
        reasons = ", ".join(f"{k} {v}" for k, v in st["skipped_by_reason"].items()) or "none"
        print(
            f"{name}: rows in {st['rows_in']} = kept {st['kept']} + skipped {st['skipped']} "
            f"({reasons}); {st['seconds']:.1f} s"
        )
    print(f"wrote {Path(a.out) / 'prepare.json'}; see 'medcap data stats {a.out}'")
    return 0


# ----------------------------------------------------------------------------------------------
# Stats
# ----------------------------------------------------------------------------------------------


def _fmt_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [
        [("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)) for v in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize_prepared(prep: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """A readable summary of a prepared folder, and the per-split stats it was built from."""
    prep = Path(prep)
    meta_path = prep / "prepare.json"
    if not meta_path.is_file():
        raise LayoutError(
            f"{prep} is not a prepared folder: {meta_path} is missing (run 'medcap data prepare' first)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    stats: dict[str, dict[str, Any]] = {}
    for name in meta.get("splits", {}):
        sp = prep / name / "stats.json"
        if sp.is_file():
            stats[name] = json.loads(sp.read_text(encoding="utf-8"))
    out = [
        f"Prepared data in {prep.resolve()}",
        f"  from {meta.get('root') or 'a folder of images + captions CSV'}; colour policy {meta.get('color_policy')}",
        "",
        "Counts per split (rows in = kept + skipped):",
    ]
    rows = [
        [n, s["rows_in"], s["kept"], s["skipped"], "yes" if s["reconciled"] else "NO", s.get("id_scheme", "")]
        for n, s in stats.items()
    ]
    if len(stats) > 1:
        rows.append(
            ["total", *(sum(s[k] for s in stats.values()) for k in ("rows_in", "kept", "skipped")), "", ""]
        )
    out.append(_fmt_table(["split", "rows in", "kept", "skipped", "reconciled", "IDs"], rows))
    out += ["", "Skipped, by reason:"]
    for n, s in stats.items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["skipped_by_reason"].items()) or "none"
        out.append(f"  {n}: {reasons}")
    if any(s.get("notes_by_kind") for s in stats.values()):
        out += ["", "Kept with a note (see notes.csv):"]
        for n, s in stats.items():
            if s.get("notes_by_kind"):
                out.append(f"  {n}: " + ", ".join(f"{k} {v:,}" for k, v in s["notes_by_kind"].items()))
    out += ["", "Images each colour policy would keep (among images passing every other check):"]
    out.append(
        _fmt_table(
            ["split", "stored-rgb", "true-color", "all", "grey as RGB", "colour marks only"],
            [
                [
                    n,
                    s["policy_counts"]["stored-rgb"],
                    s["policy_counts"]["true-color"],
                    s["policy_counts"]["all"],
                    s["color"]["grey_stored_as_rgb"] if s["color_check"]["checked"] else None,
                    s["color"]["grey_with_color_marks"] if s["color_check"]["checked"] else None,
                ]
                for n, s in stats.items()
            ],
        )
    )
    if not all(s["color_check"]["checked"] for s in stats.values()):
        out.append("  ('-': colour not measured; prepare with --check-color to measure it)")
    out += ["", "Modality of kept images (from concepts_manual):"]
    mods = [m for m in MODALITIES if any(s["modality"].get(m) for s in stats.values())] or MODALITIES
    out.append(
        _fmt_table(
            ["split", *mods], [[n, *(s["modality"].get(m, 0) for m in mods)] for n, s in stats.items()]
        )
    )
    out += ["", "Caption length in words (kept):"]
    qs = ["min", "p10", "p25", "p50", "p75", "p90", "p99", "max", "mean"]
    out.append(
        _fmt_table(
            ["split", *qs],
            [[n, *(_num(s["caption_words"].get(q)) for q in qs)] for n, s in stats.items()],
        )
    )
    return "\n".join(out), stats


def _num(v: float | None) -> str | None:
    if v is None:
        return None
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


def write_plots(prep: Path, stats: dict[str, dict[str, Any]]) -> list[Path]:
    """Caption-length histogram and modality bars as PNG files in ``prep/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = Path(prep) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    lengths: dict[str, list[int]] = {}
    for name in stats:
        mpath = Path(prep) / name / "manifest.csv"
        if mpath.is_file():
            lengths[name] = [len(r.caption.split()) for r in read_manifest(mpath)]
    all_len = [x for v in lengths.values() for x in v]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if all_len:
        cap = max(10, int(np.percentile(all_len, 99)))
        bins = np.arange(0, cap + 3, max(1, math.ceil(cap / 60)))
        for name, v in lengths.items():
            clipped = np.minimum(np.asarray(v), bins[-1] - 1)
            # Share of each split's captions, so splits of different sizes compare directly.
            weights = np.full(len(v), 100.0 / max(1, len(v)))
            ax.hist(
                clipped,
                bins=bins,
                weights=weights,
                histtype="step",
                linewidth=1.6,
                label=f"{name} (n={len(v):,}, median {np.median(v):.0f})",
            )
        ax.set_xlim(0, bins[-1])
        ax.legend()
        ax.set_xlabel(
            f"caption length in words (cleaned caption); the last bin holds all of {bins[-2]} or more"
        )
    else:
        ax.text(0.5, 0.5, "no kept captions", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("caption length in words")
    ax.set_ylabel("% of the split's captions")
    ax.set_title("Caption length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = plots / "caption_length_hist.png"
    fig.savefig(p)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    names = list(stats)
    x = np.arange(len(MODALITIES))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = [stats[name]["modality"].get(m, 0) for m in MODALITIES]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, MODALITIES, rotation=15)
    ax.set_ylabel("kept images")
    ax.set_title("Modality (from concepts_manual)")
    if names:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = plots / "modality_bars.png"
    fig.savefig(p)
    plt.close(fig)
    written.append(p)
    return written


def cli_stats(argv: list[str]) -> int:
    """``medcap data stats DIR``: print a summary of prepared data and write plots."""
    p = argparse.ArgumentParser(
        prog="medcap data stats", description="Summarise prepared manifests, with plots."
    )
    p.add_argument("dir", help="folder written by 'medcap data prepare'")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")
    a = p.parse_args(argv)
    try:
        text, stats = summarize_prepared(Path(a.dir))
    except LayoutError as e:
        print(f"medcap data stats: {e}", file=sys.stderr)
        return 2
    print(text)
    if not a.no_plots:
        for path in write_plots(Path(a.dir), stats):
            print(f"wrote {path}")
    return 0
