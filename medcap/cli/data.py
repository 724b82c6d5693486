"""``medcap data phantoms|prepare|stats|to-datasets|download``: thin wrappers over ``medcap.data``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medcap.data.download import DEFAULT_BASE_URL, DEFAULT_RECORD, DownloadError, download_rocov2
from medcap.data.inspect import DEFAULT_MAX_PIXELS
from medcap.data.partition import parse_fractions
from medcap.data.phantoms.design import MODALITIES, PhantomOptionError
from medcap.data.phantoms.make import make_phantoms
from medcap.data.prepare import POLICY_CHOICES, prepare_dataset
from medcap.data.rocov2 import EXPECTED_LAYOUT, LayoutError
from medcap.data.stats import summarize_prepared, write_plots
from medcap.data.tables import CsvError


def _parse_pair(text: str, kind: type, name: str, count: int) -> tuple:
    try:
        parts = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name}: expected {count} comma-separated numbers, got {text!r}"
        ) from None
    if len(parts) != count:
        raise argparse.ArgumentTypeError(f"{name}: expected {count} comma-separated numbers, got {text!r}")
    return parts


def cmd_phantoms(argv: list[str]) -> int:
    """``medcap data phantoms --out DIR --n N --seed S [--size-range 500,1000] [--splits 0.7,0.15,0.15]
    [--modalities ct,xray] [--blank] [--workers N] [--overwrite] [--quiet]``; returns the exit code
    (2 for a bad option or an occupied --out)."""
    ap = argparse.ArgumentParser(
        prog="medcap data phantoms",
        description="Write a synthetic radiology-like dataset (images, captions, concepts) in the ROCOv2 layout.",
    )
    ap.add_argument("--out", required=True, type=Path, help="dataset root to create")
    ap.add_argument("--n", type=int, default=300, help="total images over train/valid/test (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; same options give the same bytes")
    ap.add_argument(
        "--size-range",
        default="500,1000",
        type=lambda s: _parse_pair(s, int, "--size-range", 2),
        help="min,max pixels of each image side (default 500,1000)",
    )
    ap.add_argument(
        "--splits",
        default="0.7,0.15,0.15",
        type=lambda s: _parse_pair(s, float, "--splits", 3),
        help="train,valid,test fractions (default 0.7,0.15,0.15)",
    )
    ap.add_argument("--blank", action="store_true", help="uninformative flat images with the same captions")
    ap.add_argument(
        "--modalities",
        type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
        default=None,
        help=f"comma-separated subset of {','.join(MODALITIES)} (default: all)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace a phantom dataset already in --out")
    ap.add_argument("--workers", type=int, default=1, help="drawing processes (0 = one per CPU core)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        summary = make_phantoms(
            args.out,
            args.n,
            args.seed,
            size_range=args.size_range,
            splits=args.splits,
            blank=args.blank,
            modalities=args.modalities,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (PhantomOptionError, FileExistsError) as e:
        print(f"medcap data phantoms: {e}", file=sys.stderr, flush=True)
        return 2
    note = " (reused: already there with these options)" if summary.get("reused") else ""
    print(f"wrote phantoms to {args.out}{note}")
    for split, st in summary["splits"].items():
        print(
            f"  {split:5s} {st['images']:6d} images  L {st['stored_L']}  RGB {st['stored_RGB']}  "
            f"true colour {st['true_color']}  colour marks {st['color_marks']}  held-out combinations {st['held_out']}"
        )
    return 0


def cmd_prepare(argv: list[str]) -> int:
    """``medcap data prepare ROOT --out DIR``: check a dataset and write manifests. Exit code 2 for a
    layout or option error, 1 when a split keeps no image."""
    p = argparse.ArgumentParser(
        prog="medcap data prepare",
        description="Check a dataset (ROCOv2 / ImageCLEFmedical layouts, the Hub's parquet shards or "
        "imagefolder, or a folder of images + a CSV of ID,Caption) and write per-split manifests, "
        "skipped tables and stats.",
        epilog=EXPECTED_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "root",
        nargs="?",
        help="dataset folder (ROCOv2/ImageCLEFmedical layout, Hub parquet shards or imagefolder) or a .parquet file",
    )
    p.add_argument("--out", required=True, help="output folder for the prepared data")
    p.add_argument("--splits", help="comma-separated splits (default: those of train,valid,test present)")
    p.add_argument(
        "--color-policy",
        choices=POLICY_CHOICES,
        default="auto",
        help="which images to keep: stored-rgb (files stored with 3 channels: the original ROCOv2 recipe), "
        "true-color (images whose channels really differ), all; auto (default): stored-rgb for ROCOv2 "
        "data, all for your own data",
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
    p.add_argument("--split-name", default="data", help="split name for data without splits (default: data)")
    p.add_argument(
        "--split",
        dest="divide",
        metavar="FRACTIONS",
        help="divide data without splits into train,valid[,test] by these fractions, e.g. 0.8,0.1,0.1",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --split division (default 0)")
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
        fractions = parse_fractions(a.divide) if a.divide else None
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
            divide_fractions=fractions,
            seed=a.seed,
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
    warnings = []
    for name, st in results.items():
        reasons = ", ".join(f"{k} {v}" for k, v in st["skipped_by_reason"].items()) or "none"
        print(
            f"{name}: rows in {st['rows_in']} = kept {st['kept']} + skipped {st['skipped']} "
            f"({reasons}); colour policy {st['color_policy']} ({st['color_policy_source']}); "
            f"{st['seconds']:.1f} s"
        )
        warnings += st["warnings"]
    print(f"wrote {Path(a.out) / 'prepare.json'}; see 'medcap data stats {a.out}'")
    for text in warnings:
        print(f"WARNING: {text}", file=sys.stderr)
    empty = [name for name, st in results.items() if st["rows_in"] and not st["kept"]]
    return 1 if empty else 0


def cmd_stats(argv: list[str]) -> int:
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


def cmd_to_datasets(argv: list[str]) -> int:
    """``medcap data to-datasets PREP --out DIR [--format arrow|parquet]``: a prepared folder as a
    ``datasets`` dataset. Exit code 2 for a missing prepared split or an occupied --out."""
    from medcap.data.to_datasets import prepared_to_datasets

    p = argparse.ArgumentParser(
        prog="medcap data to-datasets",
        description="Write a prepared folder as a Hugging Face datasets dataset (images embedded).",
    )
    p.add_argument("prepared", help="folder written by 'medcap data prepare'")
    p.add_argument("--out", required=True, help="new folder for the dataset")
    p.add_argument("--splits", help="comma-separated splits (default: every prepared split)")
    p.add_argument(
        "--format",
        choices=("arrow", "parquet"),
        default="arrow",
        help="arrow: datasets.load_from_disk(OUT); parquet: the Hub's layout OUT/data/<split>-*.parquet",
    )
    a = p.parse_args(argv)
    try:
        done = prepared_to_datasets(
            a.prepared,
            a.out,
            splits=[s.strip() for s in a.splits.split(",") if s.strip()] if a.splits else None,
            fmt=a.format,
        )
    except (LayoutError, CsvError, FileExistsError) as e:
        print(f"medcap data to-datasets: {e}", file=sys.stderr)
        return 2
    for name, entry in done["splits"].items():
        print(f"{name}: {entry['rows']:,} rows")
    how = (
        f"datasets.load_from_disk({str(a.out)!r})"
        if a.format == "arrow"
        else f"datasets.load_dataset('parquet', data_dir={str(Path(a.out) / 'data')!r})"
    )
    print(f"wrote {a.out}; read it with {how}")
    return 0


def cmd_download(argv: list[str]) -> int:
    """``medcap data download --out DIR``: fetch ROCOv2 from Zenodo."""
    p = argparse.ArgumentParser(
        prog="medcap data download",
        description="Download ROCOv2 from Zenodo (doi 10.5281/zenodo.10821435): resumable, MD5-checked, unpacked.",
    )
    p.add_argument(
        "--out", required=True, help="folder for the dataset (then: medcap data prepare OUT --out PREP)"
    )
    p.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        help=f"Zenodo (or mirror) address (default {DEFAULT_BASE_URL})",
    )
    p.add_argument("--record", default=DEFAULT_RECORD, help=f"record id (default {DEFAULT_RECORD})")
    p.add_argument("--files", help="comma-separated glob patterns of file names to fetch (default: all)")
    p.add_argument("--no-unpack", action="store_true", help="keep zips packed")
    p.add_argument("--delete-zips", action="store_true", help="delete each zip after unpacking it")
    p.add_argument("--retries", type=int, default=5, help="tries per file after the first (default 5)")
    p.add_argument("--timeout", type=float, default=60, help="seconds without data before a try fails")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        summary = download_rocov2(
            a.out,
            base_url=a.base_url,
            record=a.record,
            files=[s.strip() for s in a.files.split(",") if s.strip()] if a.files else None,
            unpack=not a.no_unpack,
            delete_zips=a.delete_zips,
            retries=a.retries,
            timeout=a.timeout,
            progress=not a.no_progress,
        )
    except DownloadError as e:
        print(f"medcap data download: {e}", file=sys.stderr)
        return 2
    for key, entry in summary["files"].items():
        extra = f", unpacked to {entry['unpacked_to']}" if "unpacked_to" in entry else ""
        print(
            f"{key}: {entry['size']:,} bytes, MD5 {'verified' if entry['verified'] else 'not listed'}{extra}"
        )
    print(f"next: medcap data prepare {a.out} --out PREPARED_DIR")
    return 0
