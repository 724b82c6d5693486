"""The prepared manifest: one row per kept image, the file every later stage reads.

``medcap data prepare`` writes ``PREP/{split}/manifest.csv`` (columns ``MANIFEST_COLUMNS``; ``image`` is
an absolute path) next to ``skipped.csv`` (``SKIPPED_COLUMNS``: one row per dropped item with its
reason) and ``notes.csv`` (``NOTES_COLUMNS``: kept items with a remark); ``medcap.layout.PreparedLayout``
names the files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medcap.data.tables import read_csv_dicts

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


def read_manifest(path: str | Path, limit: int | None = None) -> list[ManifestRow]:
    """Read a prepared ``manifest.csv``; ``limit`` keeps the first N rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run 'medcap data prepare ROOT --out DIR' first, "
            "and point data.prepared at DIR"
        )
    rows: list[ManifestRow] = []
    for _line, rec in read_csv_dicts(path)[1]:  # the one CSV reader (CsvError names file and line)
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
