"""Reading ROCOv2-layout datasets and writing prepared manifests (``medcap data prepare|stats``).

Prepared layout (what every later stage reads)::

    PREP/prepare.json                 options used (root, colour policy, limits) and totals
    PREP/{split}/manifest.csv         one row per kept image (columns: MANIFEST_COLUMNS)
    PREP/{split}/skipped.csv          one row per dropped item: id, image, reason, detail
    PREP/{split}/stats.json           counts (rows in = kept + skipped), policies, modality, lengths
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

ColorPolicy = Literal["stored-rgb", "true-color", "all"]

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
    "true_color",  # 1 if the channels really differ (beyond JPEG noise), else 0
]


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
    true_color: bool = False


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
            rows.append(
                ManifestRow(
                    id=rec["id"],
                    image=rec["image"],
                    caption_raw=rec["caption_raw"],
                    caption=rec["caption"],
                    cuis=[c for c in rec.get("cuis", "").split(";") if c],
                    modality=rec.get("modality", "unknown") or "unknown",
                    width=int(rec.get("width") or 0),
                    height=int(rec.get("height") or 0),
                    mode=rec.get("mode", ""),
                    true_color=rec.get("true_color", "0") in ("1", "True", "true"),
                )
            )
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 3-channel RGB (grayscale, CMYK, palette... are converted)."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "RGB":
            return im
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit / float grey: scale to 8 bit by the image's own range before RGB.
            import numpy as np

            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
            return Image.fromarray(a.astype("uint8"), "L").convert("RGB")
        return im.convert("RGB")
