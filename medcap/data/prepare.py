"""``medcap data prepare``: check a dataset and write per-split manifests, skipped tables and stats.

Each split is read from its layout into ``medcap.data.sources.SplitRecords`` (the ROCOv2 / ImageCLEFmedical
CSV layouts and own folders in ``sources``, the Hub's parquet shards in ``parquet``, the Hub's imagefolder
in ``imagefolder``); from there every layout goes through the same image checks, colour policy,
accounting (rows in = kept + skipped, with reasons), optional ``--split`` division and files.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from medcap.data.imagefolder import find_imagefolder, read_imagefolder_split
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
from medcap.data.manifest import MANIFEST_COLUMNS, MODALITIES, NOTES_COLUMNS, SKIPPED_COLUMNS
from medcap.data.parquet import find_parquet_splits, read_parquet_split
from medcap.data.partition import PART_NAMES, assign_parts
from medcap.data.rocov2 import (
    EXPECTED_LAYOUT,
    LayoutError,
    SplitSource,
    detect_splits,
    id_scheme,
    resolve_split,
)
from medcap.data.sources import SplitRecords, read_csv_layout
from medcap.layout import PreparedLayout

#: ``auto`` is the original recipe's stored-rgb for ROCOv2 data and ``all`` for a user's own data.
PolicyChoice = Literal["auto", "stored-rgb", "true-color", "all"]

POLICY_CHOICES: tuple[str, ...] = ("auto", *COLOR_POLICIES)

# Why an item was dropped. Every skipped.csv row carries one of these, with a detail.
SKIP_REASONS: dict[str, str] = {
    "malformed_row": "the record (CSV row, metadata line, parquet row) has no ID or no usable caption field (wrong number of fields, a field "
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


@dataclass
class CheckedSplit:
    """A split after its images were checked: what is kept, what is skipped (with reasons), and the
    inspection results of the images that passed every check but the colour policy."""

    name: str
    records: SplitRecords
    color_policy: str
    policy_source: str
    """Why this policy: ``chosen`` (--color-policy) or what ``auto`` decided and why."""
    kept: list[list[Any]]
    skipped: list[list[Any]]
    notes: list[list[Any]]
    eligible: list[tuple[str, ImageInfo]]
    ids: list[str]
    caption_rows: int
    orphan_images: int
    opts: InspectOptions
    seconds: float

    @property
    def rows_in(self) -> int:
        return self.caption_rows + self.orphan_images


def resolve_color_policy(choice: str, records: SplitRecords) -> tuple[ColorPolicy, str]:
    """The colour policy of a split and why: ``auto`` keeps the original recipe's stored-rgb for
    ROCOv2 data (its release layouts, or Hub parquet with ROCOv2 IDs) and every image elsewhere."""
    if choice != "auto":
        return choice, "chosen with --color-policy"  # type: ignore[return-value]
    if records.is_rocov2:
        return "stored-rgb", "auto: ROCOv2 data, the original recipe's policy"
    return "all", "auto: your own data keeps every image (grey is converted to RGB when read)"


def check_split(
    records: SplitRecords,
    *,
    color_policy: ColorPolicy,
    policy_source: str,
    opts: InspectOptions,
    workers: int = 2,
    progress: bool = True,
) -> CheckedSplit:
    """Inspect the candidates' images and apply the colour policy. Rows in = kept + skipped, always."""
    t0 = time.perf_counter()
    skipped = list(records.skipped)
    notes = list(records.notes)
    cands = records.candidates
    infos = inspect_many(
        [c.image for c in cands], opts, workers=workers, desc=f"{records.name}: images", progress=progress
    )
    kept: list[list[Any]] = []
    eligible: list[tuple[str, ImageInfo]] = []
    for cand, info in zip(cands, infos, strict=True):
        if not info.ok:
            skipped.append([cand.id, cand.image, info.reason, info.detail])
            continue
        eligible.append((cand.id, info))
        for kind, detail in info.notes:
            notes.append([cand.id, cand.image, kind, detail])
        if not _policy_keeps(color_policy, info):
            skipped.append([cand.id, cand.image, "color_policy", _policy_detail(color_policy, info, opts)])
            continue
        tc = "" if info.true_color is None else int(info.true_color)
        kept.append(
            [
                cand.id,
                cand.image,
                cand.caption_raw,
                cand.caption,
                ";".join(cand.cuis),
                cand.modality,
                info.width,
                info.height,
                info.mode,
                tc,
            ]
        )
    checked = CheckedSplit(
        name=records.name,
        records=records,
        color_policy=color_policy,
        policy_source=policy_source,
        kept=kept,
        skipped=skipped,
        notes=notes,
        eligible=eligible,
        ids=records.ids,
        caption_rows=records.caption_rows,
        orphan_images=records.orphan_images,
        opts=opts,
        seconds=time.perf_counter() - t0,
    )
    _check_accounting(checked)
    return checked


def _check_accounting(c: CheckedSplit) -> None:
    if c.rows_in != len(c.kept) + len(c.skipped):  # an accounting bug must never pass silently
        raise AssertionError(
            f"split {c.name}: rows in {c.rows_in} != kept {len(c.kept)} + skipped {len(c.skipped)}"
        )


def divide(checked: CheckedSplit, fractions: Sequence[float], seed: int) -> list[CheckedSplit]:
    """Divide one checked split into train / valid (/ test) by ``fractions`` (``medcap.data.partition``)."""
    assigned = assign_parts(
        [r[0] for r in checked.kept], [*checked.ids, *(r[0] for r in checked.skipped)], fractions, seed
    )
    parts = []
    for name in PART_NAMES[len(fractions)]:

        def mine(rows: list[list[Any]], name: str = name) -> list[list[Any]]:
            return [r for r in rows if assigned[r[0]] == name]

        part_skipped = mine(checked.skipped)
        part = CheckedSplit(
            name=name,
            records=checked.records,
            color_policy=checked.color_policy,
            policy_source=checked.policy_source,
            kept=mine(checked.kept),
            skipped=part_skipped,
            notes=mine(checked.notes),
            eligible=[(i, info) for i, info in checked.eligible if assigned[i] == name],
            ids=[i for i in checked.ids if assigned[i] == name],
            caption_rows=sum(assigned[i] == name for i in checked.ids),
            orphan_images=sum(r[2] == "no_caption" for r in part_skipped),
            opts=checked.opts,
            seconds=checked.seconds,
        )
        _check_accounting(part)
        parts.append(part)
    return parts


def policy_warnings(c: CheckedSplit) -> list[str]:
    """Loud remarks for a split: a colour policy that dropped more than half of the readable images,
    or a split that keeps nothing."""
    out = []
    dropped = sum(r[2] == "color_policy" for r in c.skipped)
    if dropped and dropped * 2 > len(c.eligible):
        keep_all = "--color-policy all" if c.color_policy != "all" else ""
        out.append(
            f"split {c.name}: the colour policy {c.color_policy} dropped {dropped:,} of the {len(c.eligible):,} "
            f"readable images ({dropped / len(c.eligible):.0%}). To keep them pass {keep_all} (grey images are "
            "converted to RGB when read); stored-rgb is the original ROCOv2 recipe, meant for ROCOv2 only."
        )
    if c.rows_in and not c.kept:
        out.append(
            f"split {c.name}: no image kept of {c.rows_in:,} rows (see {c.name}/skipped.csv for the reasons); "
            "training and predict cannot use this split"
        )
    return out


def split_stats(c: CheckedSplit) -> dict[str, Any]:
    """The stats.json of a checked split."""
    eligible = [info for _, info in c.eligible]
    checked_color = [i for i in eligible if i.true_color is not None]
    color_checked = c.opts.check_color
    modality_counts = Counter(r[5] for r in c.kept)
    return {
        "split": c.name,
        "layout": c.records.layout,
        "id_scheme": id_scheme(c.ids),
        "sources": c.records.sources | ({"divided_from": c.records.name} if c.name != c.records.name else {}),
        "rows_in": c.rows_in,
        "caption_rows": c.caption_rows,
        "orphan_images": c.orphan_images,
        "kept": len(c.kept),
        "skipped": len(c.skipped),
        "reconciled": c.rows_in == len(c.kept) + len(c.skipped),
        "skipped_by_reason": dict(Counter(r[2] for r in c.skipped).most_common()),
        "notes_by_kind": dict(Counter(n[2] for n in c.notes).most_common()),
        "color_policy": c.color_policy,
        "color_policy_source": c.policy_source,
        "warnings": policy_warnings(c),
        "color_check": {
            "checked": color_checked,
            "threshold": c.opts.color_threshold,
            "fraction": c.opts.color_fraction,
        },
        # Among images that pass every other check: how many each policy would keep.
        "policy_counts": {
            "stored-rgb": sum(i.mode == "RGB" for i in eligible),
            "true-color": sum(bool(i.true_color) for i in eligible) if color_checked else None,
            "all": len(eligible),
        },
        "color": {
            "images_checked": len(checked_color),
            "true_color": sum(bool(i.true_color) for i in checked_color),
            "grey_stored_as_rgb": sum(i.mode == "RGB" and i.true_color is False for i in checked_color),
            "grey_with_color_marks": sum(
                (i.true_color is False) and (i.color_fraction or 0.0) > 0.0 for i in checked_color
            ),
        },
        "stored_modes": dict(Counter(i.mode for i in eligible).most_common()),
        "formats": dict(Counter(i.format for i in eligible).most_common()),
        "modality": {m: modality_counts.get(m, 0) for m in MODALITIES},
        "caption_words": _percentiles([len(r[3].split()) for r in c.kept]),
        "width": _percentiles([r[6] for r in c.kept]),
        "height": _percentiles([r[7] for r in c.kept]),
        "seconds": round(c.seconds, 3),
    }


def write_split(c: CheckedSplit, layout: PreparedLayout) -> dict[str, Any]:
    """Write a checked split's manifest, skipped, notes and stats files; returns the stats."""
    stats = split_stats(c)
    layout.split_dir(c.name).mkdir(parents=True, exist_ok=True)
    _write_csv(layout.manifest(c.name), MANIFEST_COLUMNS, c.kept)
    _write_csv(layout.skipped(c.name), SKIPPED_COLUMNS, c.skipped)
    _write_csv(layout.notes(c.name), NOTES_COLUMNS, c.notes)
    _write_json(layout.stats(c.name), stats)
    return stats


def _own_source(
    images: str | Path | None,
    captions: str | Path | None,
    concepts: str | Path | None,
    concepts_manual: str | Path | None,
    split_name: str,
) -> SplitSource:
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
    return SplitSource(
        split_name,
        captions,
        images,
        Path(concepts) if concepts else None,
        Path(concepts_manual) if concepts_manual else None,
        "plain",
    )


def _pick_splits(found: Sequence[str], wanted: Sequence[str] | None, where: Path) -> list[str]:
    if not wanted:
        return list(found)
    names = ["valid" if w == "validation" else w for w in wanted]
    missing = [w for w in names if w not in found]
    if missing:
        raise LayoutError(f"split(s) {', '.join(missing)} not in {where} (it has {', '.join(found)})")
    return names


def prepare_dataset(
    root: str | Path | None,
    out: str | Path,
    *,
    splits: Sequence[str] | None = None,
    color_policy: PolicyChoice = "auto",
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
    divide_fractions: Sequence[float] | None = None,
    seed: int = 0,
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Prepare a dataset: check every split, write manifests, and return ``{split: stats}``.

    ``root`` is a dataset folder in one of the layouts of ``medcap.data`` (checked in this order:
    the Hub's parquet shards, which may also be one ``.parquet`` file; the Hub's imagefolder; the
    ROCOv2 release and ImageCLEFmedical layouts); or pass ``images`` and ``captions`` (and optionally
    ``concepts``/``concepts_manual``) for a user's own folder, which becomes the split
    ``split_name``. ``splits`` defaults to every split found. Every split's files are located before
    any work starts, so a missing captions CSV stops the run at once (``LayoutError``).

    ``color_policy`` ``auto`` (the default) is the original recipe's stored-rgb for ROCOv2 data and
    ``all`` for anything else (``resolve_color_policy``). ``check_color`` defaults to on for the
    true-color and all policies and off for stored-rgb (then only headers are read: the fast path,
    and the manifest's true_color column is empty). ``divide_fractions`` (2 or 3 fractions, with
    ``seed``) divides data that has a single split into train / valid (/ test).
    """
    if color_policy not in POLICY_CHOICES:
        raise ValueError(f"color_policy {color_policy!r} is not one of {', '.join(POLICY_CHOICES)}")
    if color_policy == "true-color" and check_color is False:
        raise ValueError("color_policy 'true-color' needs the colour check (check_color=True)")
    out = Path(out)
    layout = PreparedLayout(out)
    t0 = time.perf_counter()

    # Locate every split's files first (cheap), so a layout error stops the run before any work.
    readers: list[tuple[str, Any]] = []
    root_s: str | None = None
    if images is not None or captions is not None:
        source = _own_source(images, captions, concepts, concepts_manual, split_name)
        readers.append((split_name, lambda s=source: read_csv_layout(s, encoding, encoding_errors)))
    else:
        if root is None:
            raise LayoutError(
                f"no dataset given: pass ROOT, or --images DIR --captions CSV.\n{EXPECTED_LAYOUT}"
            )
        root_p = Path(root)
        if not root_p.exists():
            raise LayoutError(f"dataset folder {root_p} does not exist.\n{EXPECTED_LAYOUT}")
        root_s = str(root_p.resolve())
        parquet = find_parquet_splits(root_p, split_name)
        folder = find_imagefolder(root_p, split_name) if not parquet else {}
        if parquet:
            for name in _pick_splits(list(parquet), splits, root_p):
                readers.append(
                    (
                        name,
                        lambda n=name: read_parquet_split(
                            n, parquet[n], layout.extracted_images(n), progress=progress
                        ),
                    )
                )
        elif folder:
            for name in _pick_splits(list(folder), splits, root_p):
                readers.append(
                    (name, lambda n=name: read_imagefolder_split(n, folder[n], encoding, encoding_errors))
                )
        else:
            if not root_p.is_dir():
                raise LayoutError(
                    f"{root_p} is neither a dataset folder nor a parquet file.\n{EXPECTED_LAYOUT}"
                )
            wanted = list(splits) if splits else detect_splits(root_p)
            if not wanted:
                raise LayoutError(
                    f"no split found in {root_p}: missing {root_p / 'train_captions.csv'} "
                    f"(and the valid and test ones).\n{EXPECTED_LAYOUT}"
                )
            for src in [resolve_split(root_p, s) for s in wanted]:  # all located before any work
                readers.append((src.name, lambda s=src: read_csv_layout(s, encoding, encoding_errors)))
    if divide_fractions is not None and len(readers) != 1:
        raise LayoutError(
            f"--split divides data without splits, but this data has {len(readers)}: "
            f"{', '.join(n for n, _ in readers)} (prepare them as they are, or pick one with --splits)"
        )

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    used_opts: dict[str, InspectOptions] = {}
    for _name, read in readers:
        records: SplitRecords = read()
        policy, why = resolve_color_policy(color_policy, records)
        opts = InspectOptions(
            max_pixels=max_pixels,
            check_color=(policy != "stored-rgb") if check_color is None else check_color,
            verify_decode=verify_decode,
            color_threshold=color_threshold,
            color_fraction=color_fraction,
        )
        checked = check_split(
            records, color_policy=policy, policy_source=why, opts=opts, workers=workers, progress=progress
        )
        parts = [checked] if divide_fractions is None else divide(checked, divide_fractions, seed)
        for part in parts:
            results[part.name] = write_split(part, layout)
            used_opts[part.name] = opts

    from medcap import __version__

    any_opts = next(iter(used_opts.values()), None)
    summary = {
        "medcap_version": __version__,
        "root": root_s,
        "out": str(out.resolve()),
        "layouts": {name: st["layout"] for name, st in results.items()},
        "color_policy": color_policy,
        "color_policies": {name: st["color_policy"] for name, st in results.items()},
        "divided": None if divide_fractions is None else {"fractions": list(divide_fractions), "seed": seed},
        "options": {
            **(asdict(any_opts) if any_opts else {}),
            "workers": workers,
            "encoding": encoding,
            "encoding_errors": encoding_errors,
        },
        "splits": {
            name: {
                k: st[k]
                for k in (
                    "rows_in",
                    "kept",
                    "skipped",
                    "reconciled",
                    "skipped_by_reason",
                    "id_scheme",
                    "color_policy",
                    "warnings",
                )
            }
            for name, st in results.items()
        },
        "totals": {k: sum(st[k] for st in results.values()) for k in ("rows_in", "kept", "skipped")},
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(layout.summary, summary)
    return results
