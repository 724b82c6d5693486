"""The Hugging Face Hub's parquet layout, read from local files (e.g. ROCOv2 as
``eltorio/ROCOv2-radiology`` or Unsloth's ``Radiology_mini``, downloaded with ``huggingface-cli``).

Layout: ``ROOT/data/<split>-NNNNN-of-NNNNN.parquet`` (also straight in ``ROOT/``, and with the
fingerprint suffix older repositories have, ``train-00000-of-00002-1a2b3c.parquet``), or one
``.parquet`` file. Columns: ``image`` (the ``datasets`` Image type: a struct of ``bytes`` and
``path``; plain binary works too), ``image_id`` (or ``id``; without one the ID is the stem of the
image's ``path``, else ``<split>_<row>``), ``caption`` (or ``text``) and optionally ``cui`` (a list
of CUIs, or a string joined by ';'). The Hub's ``validation`` split is medcap's ``valid``.

The images are the bytes inside the parquet rows. They are written as files into the prepared folder
(``PreparedLayout.extracted_images(split)``: ``PREP/images/<split>/<ID>.<ext>``, the extension from
the content) before the same checks as any image file run on them, so the decode limits and the
colour policies hold for parquet bytes exactly as for files, and the manifests point at files that
stay where they are: keep the prepared folder whole (deleting ``PREP/images/`` breaks its manifests).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from medcap.data.images import claimed_format, is_dicom_bytes
from medcap.data.manifest import MODALITY_CUIS, modality_from_cuis
from medcap.data.rocov2 import LayoutError
from medcap.data.sources import Candidate, SplitRecords
from medcap.data.tables import MAX_FIELD_CHARS, clean_caption

#: ``<split>-00000-of-00003.parquet``, optionally with a fingerprint after the shard count.
SHARD_NAME = re.compile(
    r"^(?P<split>[A-Za-z0-9_.]+?)-(?P<index>\d{5})-of-(?P<total>\d{5})(?:-[0-9a-f]+)?\.parquet$"
)

#: The Hub's split names that medcap names otherwise.
SPLIT_NAMES = {"validation": "valid"}

ID_COLUMNS = ("image_id", "id", "ID")
CAPTION_COLUMNS = ("caption", "text", "Caption")
CUI_COLUMNS = ("cui", "cuis", "CUIs", "concepts")

_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp", "GIF": ".gif"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def split_order(name: str) -> tuple[int, str]:
    """Sort key of split names: train, valid, test, then the others by name."""
    return ({"train": 0, "valid": 1, "test": 2}.get(name, 3), name)


def medcap_split_name(hub_name: str) -> str:
    """medcap's name for a Hub split (``validation`` -> ``valid``; others unchanged)."""
    return SPLIT_NAMES.get(hub_name, hub_name)


def find_parquet_splits(root: Path, single_split: str = "data") -> dict[str, list[Path]]:
    """The parquet shards of each split under ``root`` (``{}`` when there are none); ``root`` may be
    one parquet file (its split from the shard name, else ``single_split``). Raises ``LayoutError``
    when a split's shards are incomplete (``-00001-of-00003`` without ``-00002-``), naming the missing."""
    if root.is_file():
        m = SHARD_NAME.match(root.name)
        return (
            {medcap_split_name(m["split"]) if m else single_split: [root]}
            if root.suffix == ".parquet"
            else {}
        )
    for folder in (root / "data", root):
        if not folder.is_dir():
            continue
        shards: dict[str, list[tuple[int, int, Path]]] = {}
        for p in sorted(folder.glob("*.parquet")):
            m = SHARD_NAME.match(p.name)
            if m:
                shards.setdefault(medcap_split_name(m["split"]), []).append(
                    (int(m["index"]), int(m["total"]), p)
                )
        if not shards:
            continue
        found: dict[str, list[Path]] = {}
        for split, items in sorted(shards.items(), key=lambda kv: split_order(kv[0])):
            totals = {t for _, t, _ in items}
            have = {i for i, _, _ in items}
            total = max(totals)
            missing = [i for i in range(total) if i not in have]
            if missing or len(totals) > 1:
                example = items[0][2].name
                raise LayoutError(
                    f"split '{split}' in {folder} is incomplete: shard(s) {', '.join(f'{i:05d}' for i in missing)} "
                    f"of {total:05d} are missing (have e.g. {example}). Download the missing files, or "
                    f"leave the split out with --splits."
                )
            found[split] = [p for _, _, p in sorted(items)]
        return found
    return {}


def _columns(path: Path, names: list[str]) -> tuple[str, str | None, str, str | None]:
    """The image, ID, caption and CUI columns of a parquet file (``LayoutError`` naming what is missing)."""
    image = "image" if "image" in names else None
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    if image is None or caption is None:
        raise LayoutError(
            f"{path}: columns {names} have no {'image' if image is None else 'caption'} column. Expected "
            f"the Hub's layout: 'image' (bytes and path), 'image_id', 'caption' (or 'text'), optionally 'cui'."
        )
    return (
        image,
        next((c for c in ID_COLUMNS if c in names), None),
        caption,
        next((c for c in CUI_COLUMNS if c in names), None),
    )


def _open(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LayoutError(f"{path} is not a readable parquet file ({e}); download it again") from None


def _cuis(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).replace(",", ";").split(";")
    return [str(c).strip() for c in items if c is not None and str(c).strip()]


def _file_name(image_id: str, data: bytes, taken: set[str], row: int) -> str:
    """A file name for the image of ``image_id``: the ID itself where it is a safe file name (no
    folder parts, no leading dot, unique even on a case-insensitive disk), else ``_row<N>``;
    the extension from the content."""
    fmt = claimed_format(data[:8]) or ("DICOM" if is_dicom_bytes(data[:132]) else None)
    ext = _EXTENSIONS.get(fmt or "", ".dcm" if fmt == "DICOM" else ".bin")
    stem = (
        image_id if _SAFE_NAME.match(image_id) and image_id.lower() + ext not in taken else f"_row{row:07d}"
    )
    taken.add((stem + ext).lower())
    return stem + ext


def read_parquet_split(
    split: str, files: list[Path], images_out: Path, *, progress: bool = True
) -> SplitRecords:
    """Read one split's parquet shards: write each row's image bytes into ``images_out`` (emptied
    first: it belongs to the prepared folder) and return the rows as candidates and skipped rows."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    opened = [(p, _open(p)) for p in files]  # every shard checked before any work
    cols = [(p, _columns(p, pf.schema_arrow.names)) for p, pf in opened]
    total_rows = sum(pf.metadata.num_rows for _, pf in opened)

    if images_out.exists():
        shutil.rmtree(images_out)
    images_out.mkdir(parents=True)
    out_dir = str(images_out.resolve())

    candidates: list[Candidate] = []
    skipped: list[list[Any]] = []
    ids: list[str] = []
    first_row: dict[str, str] = {}
    taken: set[str] = set()
    written_bytes = 0
    row_no = 0
    bar = tqdm(
        total=total_rows, desc=f"{split}: parquet rows", unit="row", disable=not progress, mininterval=0.5
    )
    try:
        for (path, pf), (_, (img_col, id_col, cap_col, cui_col)) in zip(opened, cols, strict=True):
            wanted = [c for c in (img_col, id_col, cap_col, cui_col) if c]
            try:
                for batch in pf.iter_batches(batch_size=64, columns=wanted):
                    data = {c: batch.column(c).to_pylist() for c in wanted}
                    for i in range(batch.num_rows):
                        row_no += 1
                        where = f"{path.name} row {row_no}"
                        image = data[img_col][i]
                        img_bytes, img_path = (
                            (image.get("bytes"), image.get("path"))
                            if isinstance(image, dict)
                            else (image, None)
                        )
                        rid = _row_id(data[id_col][i] if id_col else None, img_path, split, row_no, id_col)
                        ids.append(rid)
                        raw = data[cap_col][i]
                        cuis = _cuis(data[cui_col][i]) if cui_col else []
                        outcome = _row_outcome(rid, raw, img_bytes, img_path, where, first_row)
                        if outcome is not None:
                            skipped.append(outcome)
                            bar.update()
                            continue
                        first_row[rid] = where
                        name = _file_name(rid, img_bytes, taken, row_no)
                        target = os.path.join(out_dir, name)
                        with open(target, "wb") as f:
                            f.write(img_bytes)
                        written_bytes += len(img_bytes)
                        candidates.append(
                            Candidate(
                                id=rid,
                                image=target,
                                caption_raw=raw,
                                caption=clean_caption(raw),
                                cuis=cuis,
                                # The Hub copy has the automatic concepts only: a modality where they name one.
                                modality=modality_from_cuis(cuis)
                                if set(cuis) & MODALITY_CUIS.keys()
                                else "unknown",
                            )
                        )
                        bar.update()
            except (OSError, pa.ArrowException) as e:
                raise LayoutError(
                    f"{path}: reading failed near row {row_no + 1} ({e}); the file is damaged: download it again"
                ) from None
    finally:
        bar.close()
    return SplitRecords(
        name=split,
        layout="parquet",
        candidates=candidates,
        skipped=skipped,
        notes=[],
        ids=ids,
        caption_rows=row_no,
        sources={
            "parquet_files": [str(p) for p in files],
            "rows_per_file": {p.name: pf.metadata.num_rows for p, pf in opened},
            "columns": dict(zip(("image", "id", "caption", "cui"), cols[0][1], strict=True)),
            "images": out_dir,
            "image_files": len(candidates),
            "extracted_bytes": written_bytes,
        },
    )


def _row_id(value: Any, img_path: Any, split: str, row: int, id_col: str | None) -> str:
    if id_col is not None:
        return "" if value is None else str(value).strip()
    stem = os.path.splitext(os.path.basename(str(img_path)))[0] if img_path else ""
    return stem or f"{split}_{row:06d}"


def _row_outcome(
    rid: str, raw: Any, img_bytes: Any, img_path: Any, where: str, first_row: dict[str, str]
) -> list[Any] | None:
    """The skipped row for a parquet row that cannot be a candidate, or None when it can."""
    if not rid:
        return [rid, "", "malformed_row", f"{where}: no ID"]
    if rid in first_row:
        return [rid, "", "duplicate_id", f"{where} repeats the ID of {first_row[rid]}"]
    if raw is not None and not isinstance(raw, str):
        return [rid, "", "malformed_row", f"{where}: the caption is a {type(raw).__name__}, not text"]
    if isinstance(raw, str) and len(raw) > MAX_FIELD_CHARS:
        return [
            rid,
            "",
            "malformed_row",
            f"{where}: a caption of {len(raw):,} characters, over the limit of {MAX_FIELD_CHARS:,}",
        ]
    if not isinstance(img_bytes, bytes | bytearray):
        what = f" (its path says {img_path!r}: images are read from the bytes only)" if img_path else ""
        return [rid, "", "missing_image", f"{where} has no image bytes{what}"]
    if raw is None or not clean_caption(raw):
        return [rid, "", "empty_caption", f"{where}: raw caption {raw!r}"]
    return None
