"""Finding the files of a dataset: the ROCOv2 release and the ImageCLEFmedical editions' layouts,
or a user's own folder of images with a captions CSV."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


class LayoutError(ValueError):
    """The dataset folder does not have the expected files; the message names them."""


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
        self.outside: set[str] = set()
        """Names that are symbolic links leading outside the folder: matched to their IDs, never read."""
        real_folder = os.path.realpath(folder)
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.is_file():
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([real_folder, target]) != real_folder:
                        self.outside.add(entry.name)
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
