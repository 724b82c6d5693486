"""A split's rows as read from where the data lives, before any image is inspected.

Every input layout (the ROCOv2 release and the ImageCLEFmedical editions with their captions CSVs,
a user's own folder with a CSV, the Hub's parquet shards, the Hub's imagefolder) is read into one
``SplitRecords``: the rows that passed the row checks (``Candidate``: an ID, an image file, a
caption) and the rows that did not (``skipped``, with a reason of ``medcap.data.prepare.SKIP_REASONS``).
``medcap.data.prepare`` then checks the candidates' images the same way whatever the layout, so the
colour policies and the bad-input accounting (rows in = kept + skipped) are the same everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medcap.data.manifest import modality_from_cuis
from medcap.data.rocov2 import ImageIndex, SplitSource
from medcap.data.tables import CaptionRow, clean_caption, read_captions, read_concepts

#: Layouts whose data is ROCOv2 as released (or an ImageCLEFmedical edition of it): the default
#: colour policy there is the original recipe's stored-rgb; everywhere else it keeps every image.
ROCOV2_LAYOUTS = frozenset({"rocov2-release", "imageclef-split-folder", "imageclef-2023"})


@dataclass
class Candidate:
    """A row that passed the row checks; its image is still to be inspected."""

    id: str
    image: str
    """Absolute path of the image file."""
    caption_raw: str
    caption: str
    """The caption cleaned by ``medcap.data.tables.clean_caption`` (never empty)."""
    cuis: list[str] = field(default_factory=list)
    modality: str = "unknown"


@dataclass
class SplitRecords:
    """One split as read from its source: candidates, rows skipped already, notes, and facts."""

    name: str
    layout: str
    """``rocov2-release``, ``imageclef-split-folder``, ``imageclef-2023``, ``plain``, ``parquet``, ``imagefolder``."""
    candidates: list[Candidate]
    skipped: list[list[Any]]
    """Rows of ``SKIPPED_COLUMNS``: id, image, reason, detail."""
    notes: list[list[Any]]
    """Rows of ``NOTES_COLUMNS``: id, image, note, detail."""
    ids: list[str]
    """Every row's ID in source order (for the ID scheme)."""
    caption_rows: int
    """Records of the captions table (CSV rows, parquet rows, metadata lines)."""
    orphan_images: int = 0
    """Image files without a row (each is one skipped ``no_caption`` item)."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Where the split came from (files, counts), for stats.json."""

    @property
    def rows_in(self) -> int:
        return self.caption_rows + self.orphan_images

    @property
    def is_rocov2(self) -> bool:
        """ROCOv2 as released (its layouts, or Hub parquet whose IDs are ROCOv2's or an edition's)."""
        from medcap.data.rocov2 import id_scheme

        if self.layout in ROCOV2_LAYOUTS:
            return True
        return self.layout == "parquet" and id_scheme(self.ids).startswith(("rocov2", "imageclef"))


def malformed_detail(label: str, row: CaptionRow) -> str:
    """Why a captions record is not a row, naming the file and line."""
    if row.problem:
        return f"{label} {row.problem}"
    what = "no ID" if not row.id else "wrong number of fields (an unquoted comma?)"
    return f"{label} line {row.line}: {what}"


def read_csv_layout(
    source: SplitSource,
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
) -> SplitRecords:
    """Read one split of a layout with a captions CSV and an image folder (ROCOv2 release, the
    ImageCLEFmedical editions, a user's ``--images DIR --captions CSV``)."""
    captions, cap_facts = read_captions(source.captions, encoding, encoding_errors)
    concepts, con_facts = read_concepts(source.concepts, encoding, encoding_errors)
    manual, man_facts = read_concepts(source.concepts_manual, encoding, encoding_errors)
    index = ImageIndex(source.images)
    img_dir = str(source.images.resolve())  # resolved once: per-file resolve() costs syscalls
    label = source.captions.name

    skipped: list[list[Any]] = []
    notes: list[list[Any]] = []
    first_line: dict[str, int] = {}
    used_files: set[str] = set()
    candidates: list[Candidate] = []

    for row in captions:
        if not row.id or row.caption_raw is None:
            # The row's image (if any) is accounted for by this row, not reported again as an orphan.
            name, others = index.find(row.id) if row.id else (None, [])
            used_files.update([name, *others] if name else [])
            img = os.path.join(img_dir, name) if name else ""
            skipped.append([row.id, img, "malformed_row", malformed_detail(label, row)])
            continue
        if row.id in first_line:
            skipped.append(
                [
                    row.id,
                    "",
                    "duplicate_id",
                    f"{label} line {row.line} repeats the ID of line {first_line[row.id]}",
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
        if name in index.outside:
            skipped.append(
                [
                    row.id,
                    img_path,
                    "outside_folder",
                    f"{name} is a symbolic link that leads outside {source.images}; it is not followed "
                    "(copy the image into the folder to use it)",
                ]
            )
            continue
        caption = clean_caption(row.caption_raw)
        if not caption:
            skipped.append(
                [row.id, img_path, "empty_caption", f"line {row.line}: raw caption {row.caption_raw!r}"]
            )
            continue
        if others:
            notes.append([row.id, img_path, "duplicate_image_name", f"also present: {', '.join(others)}"])
        if row.replaced:
            notes.append([row.id, img_path, "decode_replaced", f"{label} line {row.line}"])
        candidates.append(
            Candidate(
                id=row.id,
                image=img_path,
                caption_raw=row.caption_raw,
                caption=caption,
                cuis=concepts.get(row.id, []) if concepts is not None else [],
                modality=modality_from_cuis(manual.get(row.id) if manual is not None else None),
            )
        )

    orphans: list[str] = []
    if not source.images_shared:
        orphans = sorted(n for n in index.by_name if n not in used_files)
    for name in orphans:
        skipped.append(
            [os.path.splitext(name)[0], os.path.join(img_dir, name), "no_caption", f"no row in {label}"]
        )

    return SplitRecords(
        name=source.name,
        layout=source.layout,
        candidates=candidates,
        skipped=skipped,
        notes=notes,
        ids=[r.id for r in captions],
        caption_rows=len(captions),
        orphan_images=len(orphans),
        sources={
            "captions": cap_facts,
            "concepts": con_facts,
            "concepts_manual": man_facts,
            "images": str(Path(img_dir)),
            "image_files": len(index.by_name),
            "ignored_files": len(index.ignored),
            "orphan_check": not source.images_shared,
        },
    )
