"""``medcap data to-datasets``: a prepared folder as a Hugging Face ``datasets`` dataset.

Each prepared split becomes a split of a ``DatasetDict`` with the manifest's columns and the image
itself (the ``datasets`` Image type holding the file's own bytes, not re-encoded, so the dataset
does not depend on the prepared folder any more). Two formats:

* ``arrow`` (default): ``DatasetDict.save_to_disk``; read back with ``datasets.load_from_disk(OUT)``.
* ``parquet``: the Hub's layout, ``OUT/data/<split>-NNNNN-of-NNNNN.parquet`` (``valid`` written as
  the Hub's ``validation``): upload it with ``huggingface-cli upload``, read it with
  ``load_dataset("parquet", data_dir=OUT/data)`` or with ``medcap data prepare OUT`` again.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from medcap.data.manifest import read_manifest
from medcap.data.rocov2 import LayoutError
from medcap.layout import PreparedLayout

#: Largest parquet shard written (bytes of the Arrow table, before compression); the Hub's own
#: conversion uses about this size.
PARQUET_SHARD_BYTES = 500 * 1024 * 1024

#: medcap's split names that the Hub names otherwise.
HUB_SPLIT_NAMES = {"valid": "validation"}


def _features() -> Any:
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "image_id": Value("string"),
            "caption": Value("string"),
            "caption_raw": Value("string"),
            "cui": List(Value("string")),
            "modality": Value("string"),
            "width": Value("int32"),
            "height": Value("int32"),
            "mode": Value("string"),
            "true_color": Value("bool"),
        }
    )


def _rows(manifest: str) -> Any:
    """The manifest's rows with each image's bytes (a generator for ``Dataset.from_generator``)."""
    for row in read_manifest(manifest):
        path = Path(row.image)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LayoutError(
                f"{manifest}: the image of {row.id} cannot be read ({path}: {e.strerror or e}); the "
                "prepared folder was moved or its images deleted: run 'medcap data prepare' again"
            ) from None
        yield {
            "image": {"bytes": data, "path": path.name},
            "image_id": row.id,
            "caption": row.caption,
            "caption_raw": row.caption_raw,
            "cui": row.cuis,
            "modality": row.modality,
            "width": row.width,
            "height": row.height,
            "mode": row.mode,
            "true_color": row.true_color,
        }


def prepared_to_datasets(
    prepared: str | Path,
    out: str | Path,
    *,
    splits: list[str] | None = None,
    fmt: Literal["arrow", "parquet"] = "arrow",
) -> dict[str, Any]:
    """Write the splits of a prepared folder as a ``datasets`` dataset into ``out`` (``fmt``:
    ``arrow`` for ``load_from_disk``, ``parquet`` for the Hub's layout); returns what was written."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    layout = PreparedLayout(prepared)
    found = layout.splits()
    if not found:
        raise LayoutError(
            f"{prepared} has no prepared split (no */manifest.csv): run 'medcap data prepare' first"
        )
    names = splits or found
    missing = [s for s in names if s not in found]
    if missing:
        raise LayoutError(f"split(s) {', '.join(missing)} not in {prepared} (it has {', '.join(found)})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pass a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    disable_progress_bars()  # datasets' own bars say "Generating train split", which we say better
    written: dict[str, Any] = {"format": fmt, "out": str(out), "splits": {}}
    # datasets writes each split to an Arrow cache first: keep it beside the output, then delete it.
    cache = Path(tempfile.mkdtemp(prefix=".medcap-datasets-", dir=out.parent))
    try:
        parts = {}
        for name in names:
            parts[name] = Dataset.from_generator(
                _rows,
                features=_features(),
                cache_dir=str(cache),
                gen_kwargs={"manifest": str(layout.manifest(name))},
            )
            written["splits"][name] = {"rows": parts[name].num_rows}
        if fmt == "arrow":
            DatasetDict(parts).save_to_disk(str(out))
        elif fmt == "parquet":
            (out / "data").mkdir(parents=True, exist_ok=True)
            for name, ds in parts.items():
                hub = HUB_SPLIT_NAMES.get(name, name)
                shards = max(1, math.ceil(ds.data.nbytes / PARQUET_SHARD_BYTES))
                files = []
                for i in range(shards):
                    path = out / "data" / f"{hub}-{i:05d}-of-{shards:05d}.parquet"
                    ds.shard(shards, i, contiguous=True).to_parquet(str(path))
                    files.append(path.name)
                written["splits"][name]["files"] = files
        else:
            raise ValueError(f"format {fmt!r} is not one of arrow, parquet")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return written
