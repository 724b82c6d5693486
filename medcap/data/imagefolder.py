"""The Hugging Face Hub's imagefolder layout: images beside ``metadata.csv`` or ``metadata.jsonl``.

Layouts: ``ROOT/metadata.csv`` (one split; ``--split`` divides it) or ``ROOT/<split>/metadata.csv``
per split (the Hub's ``validation`` is medcap's ``valid``); ``.jsonl`` (one JSON object a line)
instead of ``.csv`` works the same. Columns: ``file_name`` (the image's path relative to the
metadata file's folder; sub-folders allowed, leaving the folder is not) and the caption in ``text``
or ``caption``; optionally ``id`` / ``image_id`` (default: ``file_name`` without its extension) and
``cui`` / ``cuis`` (a list, or CUIs joined by ';'). Other columns are ignored. Image files under
the folder that no row names are reported as ``no_caption``, as for every layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from medcap.data.manifest import MODALITY_CUIS, modality_from_cuis
from medcap.data.parquet import medcap_split_name, split_order
from medcap.data.rocov2 import IMAGE_EXTENSIONS, LayoutError
from medcap.data.sources import Candidate, SplitRecords
from medcap.data.tables import MAX_FIELD_CHARS, CsvError, clean_caption, decode_csv_bytes, read_csv_table

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
TEXT_COLUMNS = ("text", "caption", "Caption")
ID_COLUMNS = ("id", "image_id", "ID")
CUI_COLUMNS = ("cui", "cuis", "CUIs")


def _metadata_in(folder: Path) -> Path | None:
    found = [folder / n for n in METADATA_NAMES if (folder / n).is_file()]
    if len(found) > 1:
        raise LayoutError(
            f"{folder} has both metadata.csv and metadata.jsonl: keep one (the Hub refuses both as well)"
        )
    return found[0] if found else None


def find_imagefolder(root: Path, single_split: str = "data") -> dict[str, Path]:
    """The metadata file of each split of an imagefolder under ``root`` (``{}`` when it is none):
    ``ROOT/metadata.*`` is the split ``single_split``, ``ROOT/<split>/metadata.*`` one split each."""
    if not root.is_dir():
        return {}
    top = _metadata_in(root)
    if top is not None:
        return {single_split: top}
    found: dict[str, Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = _metadata_in(child)
        if meta is not None:
            found[medcap_split_name(child.name)] = meta
    return dict(sorted(found.items(), key=lambda kv: split_order(kv[0])))


def _jsonl_rows(
    path: Path, encoding: str, errors: str
) -> tuple[list[tuple[int, dict[str, Any] | None, str]], int]:
    """``(line, object or None, problem)`` per non-blank line, and the count of lines with replaced bytes."""
    data = path.read_bytes()
    if errors == "replace":
        text = data.decode(encoding, errors="replace")
    else:
        text = decode_csv_bytes(data, str(path), encoding)  # names the line of a bad byte
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    replaced = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        replaced += "\ufffd" in line
        if len(line) > 2 * MAX_FIELD_CHARS:
            rows.append(
                (n, None, f"a line of {len(line):,} characters, over the limit of {2 * MAX_FIELD_CHARS:,}")
            )
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((n, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append((n, None, f"a JSON {type(obj).__name__}, not an object with file_name and text"))
            continue
        rows.append((n, obj, ""))
    return rows, replaced


def _csv_rows(
    path: Path, encoding: str, errors: Literal["strict", "replace"]
) -> list[tuple[int, dict[str, Any] | None, str]]:
    """``(line, row, problem)`` per record; a malformed record's row holds only its ``file_name``
    (where the field is there), so its image is accounted for by the row and not as an orphan."""
    table = read_csv_table(path, encoding, errors)
    if not table.records:
        return []
    header = [h.strip() for h in table.records[0].fields]
    name_at = header.index("file_name") if "file_name" in header else None
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    for rec in table.records[1:]:
        problem = rec.problem()
        if not problem and len(rec.fields) != len(header):
            problem = f"{len(rec.fields)} fields for a header of {len(header)} (an unquoted comma?)"
        if problem:
            guess = rec.fields[name_at] if name_at is not None and name_at < len(rec.fields) else None
            rows.append((rec.line, {"file_name": guess} if guess else None, problem))
        else:
            rows.append((rec.line, dict(zip(header, rec.fields, strict=True)), ""))
    return rows


def _relative(file_name: Any) -> str:
    """A metadata row's ``file_name`` as a normalised relative path ('' when there is none)."""
    if not isinstance(file_name, str) or not file_name.strip():
        return ""
    return os.path.normpath(file_name.strip().replace("\\", "/"))


def _inside(real_folder: str, path: str) -> bool:
    """True when ``path`` (symbolic links resolved) lies inside ``real_folder``."""
    return os.path.commonpath([real_folder, os.path.realpath(path)]) == real_folder


def _pick(names: Any, choices: tuple[str, ...]) -> str | None:
    return next((c for c in choices if c in names), None)


def _cuis(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).replace(",", ";").split(";")
    return [str(c).strip() for c in items if c is not None and str(c).strip()]


def read_imagefolder_split(
    split: str,
    metadata: Path,
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
) -> SplitRecords:
    """Read one imagefolder split: its metadata rows, the image each names, and the folder's images
    that no row names."""
    folder = metadata.parent
    folder_s = str(folder.resolve())
    real_folder = os.path.realpath(folder)
    label = metadata.name
    replaced_lines = 0
    try:
        if metadata.suffix == ".jsonl":
            rows, replaced_lines = _jsonl_rows(metadata, encoding, encoding_errors)
        else:
            rows = _csv_rows(metadata, encoding, encoding_errors)
    except CsvError as e:
        raise LayoutError(str(e)) from None
    columns: set[str] = set()
    for _, obj, problem in rows:
        if obj and not problem:
            columns.update(obj)
    if rows and "file_name" not in columns:
        raise LayoutError(
            f"{metadata}: no 'file_name' column (columns: {sorted(columns)}). The Hub's imagefolder layout "
            "needs 'file_name' (the image's path beside the metadata file) and a 'text' or 'caption' column."
        )
    text_col = _pick(columns, TEXT_COLUMNS)
    if rows and text_col is None:
        raise LayoutError(
            f"{metadata}: no caption column (columns: {sorted(columns)}); name it 'text' or 'caption'."
        )
    id_col = _pick(columns, ID_COLUMNS)
    cui_col = _pick(columns, CUI_COLUMNS)

    candidates: list[Candidate] = []
    skipped: list[list[Any]] = []
    notes: list[list[Any]] = []
    ids: list[str] = []
    first_line: dict[str, int] = {}
    used: set[str] = set()
    for line, obj, problem in rows:
        where = f"{label} line {line}"
        file_name = (obj or {}).get("file_name")
        rel = _relative(file_name)
        full = os.path.join(folder_s, rel) if rel else ""
        if rel:
            used.add(rel)
        if problem or obj is None:
            ids.append("")
            shown = full if rel and _inside(real_folder, full) else ""
            skipped.append(["", shown, "malformed_row", f"{where}: {problem}"])
            continue
        rid = str(obj.get(id_col) or "").strip() if id_col else os.path.splitext(rel)[0] if rel else ""
        ids.append(rid)
        if not rid or not rel:
            skipped.append([rid, full, "malformed_row", f"{where}: no {'file_name' if not rel else 'ID'}"])
            continue
        if rid in first_line:
            skipped.append([rid, "", "duplicate_id", f"{where} repeats the ID of line {first_line[rid]}"])
            continue
        first_line[rid] = line
        if os.path.isabs(str(file_name)) or not _inside(real_folder, full):
            skipped.append(
                [
                    rid,
                    "",
                    "outside_folder",
                    f"{where}: file_name {file_name!r} leads outside {folder}; not followed",
                ]
            )
            continue
        if not os.path.isfile(full):
            skipped.append([rid, full, "missing_image", f"{where}: no file {rel} in {folder}"])
            continue
        raw = obj.get(text_col)
        if raw is not None and not isinstance(raw, str):
            raw = str(raw)
        if raw is not None and len(raw) > MAX_FIELD_CHARS:
            skipped.append(
                [rid, full, "malformed_row", f"{where}: a caption of {len(raw):,} characters, over the limit"]
            )
            continue
        if raw is None or not clean_caption(raw):
            skipped.append([rid, full, "empty_caption", f"{where}: raw caption {raw!r}"])
            continue
        if "\ufffd" in raw and encoding_errors == "replace":
            notes.append([rid, full, "decode_replaced", where])
        cuis = _cuis(obj.get(cui_col)) if cui_col else []
        candidates.append(
            Candidate(
                id=rid,
                image=full,
                caption_raw=raw,
                caption=clean_caption(raw),
                cuis=cuis,
                modality=modality_from_cuis(cuis) if set(cuis) & MODALITY_CUIS.keys() else "unknown",
            )
        )

    orphans: list[str] = []
    image_files = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # symbolic links to folders are not followed
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            image_files += 1
            rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, name), folder))
            if rel not in used:
                orphans.append(rel)
    for rel in orphans:
        skipped.append(
            [
                os.path.splitext(rel)[0],
                os.path.join(folder_s, rel),
                "no_caption",
                f"no row in {label}",
            ]
        )
    return SplitRecords(
        name=split,
        layout="imagefolder",
        candidates=candidates,
        skipped=skipped,
        notes=notes,
        ids=ids,
        caption_rows=len(rows),
        orphan_images=len(orphans),
        sources={
            "metadata": str(metadata),
            "columns": {"file_name": "file_name", "text": text_col, "id": id_col, "cui": cui_col},
            "images": folder_s,
            "image_files": image_files,
            "records_with_replaced_bytes": replaced_lines,
        },
    )
