"""``medcap data prepare``: check a dataset and write per-split manifests, skipped tables and stats."""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from medcap.data.inspect import (
    COLOR_POLICIES,
    DEFAULT_MAX_PIXELS,
    ColorPolicy,
    ImageInfo,
    InspectOptions,
    _policy_detail,
    _policy_keeps,
    inspect_many,
)
from medcap.data.manifest import (
    MANIFEST_COLUMNS,
    MODALITIES,
    NOTES_COLUMNS,
    SKIPPED_COLUMNS,
    modality_from_cuis,
)
from medcap.data.rocov2 import (
    EXPECTED_LAYOUT,
    ImageIndex,
    LayoutError,
    SplitSource,
    detect_splits,
    id_scheme,
    resolve_split,
)
from medcap.data.tables import CaptionRow, clean_caption, read_captions, read_concepts

# Why an item was dropped. Every skipped.csv row carries one of these, with a detail.
SKIP_REASONS: dict[str, str] = {
    "malformed_row": "the CSV record has no ID or no usable caption field (wrong number of fields, a field "
    "over the length limit, or an unclosed quote that swallowed the rows after it)",
    "duplicate_id": "the ID appeared earlier in the captions CSV (the first row is kept)",
    "missing_image": "a caption row whose image file is not in the image folder",
    "no_caption": "an image file with no row in the captions CSV",
    "empty_caption": "the caption is empty after stripping whitespace",
    "empty_file": "the image file has zero bytes",
    "truncated": "the image file ends early (download or copy cut short)",
    "corrupt": "the image file is damaged and cannot be decoded",
    "unreadable": "not an image format Pillow can read",
    "too_many_pixels": "width x height (or the decoded bytes) over the limit (decompression-bomb guard)",
    "too_many_scans": "a progressive JPEG with more scans than any encoder writes (a decoding-time bomb)",
    "outside_folder": "a symbolic link that leads outside the image folder (not followed)",
    "color_policy": "the image does not pass the chosen colour policy",
}

# Remarks on kept items (notes.csv): kept, but a person may want to know.
NOTE_KINDS: dict[str, str] = {
    "format_mismatch": "the file's content is another format than its extension says (read by content)",
    "decode_replaced": "the CSV row held bytes that are not valid in the encoding; replaced by U+FFFD",
    "image_warning": "Pillow warned while reading the file",
    "duplicate_image_name": "several files share this ID's stem; the one listed was used",
}


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
            # The row's image (if any) is accounted for by this row, not reported again as an orphan.
            name, others = index.find(row.id) if row.id else (None, [])
            used_files.update([name, *others] if name else [])
            img = os.path.join(img_dir, name) if name else ""
            if row.problem:
                detail = f"{source.captions.name} {row.problem}"
            else:
                what = "no ID" if not row.id else "wrong number of fields (an unquoted comma?)"
                detail = f"{source.captions.name} line {row.line}: {what}"
            skipped.append([row.id, img, "malformed_row", detail])
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
