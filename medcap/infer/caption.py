"""``medcap caption``: caption image files and folders (JPEG, PNG, TIFF, DICOM)."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medcap.config.generate import GenerateConfig
from medcap.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageReadError, is_dicom_file
from medcap.infer.generate import Captioner, prefetched


def collect_image_files(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """``(candidates, ignored)`` for the files and folders given on the command line.

    A named file is always a candidate (an error says why it cannot be read); in folders (searched
    recursively, hidden files skipped) files with an image suffix or DICOM content are candidates and
    the others are ignored (listed, never silently).
    """

    candidates: list[Path] = []
    ignored: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path, bucket: list[Path]) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            bucket.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if f.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(f):
                    add(f, candidates)
                else:
                    add(f, ignored)
        else:
            add(p, candidates)
    return candidates, ignored


@dataclass
class CaptionResult:
    """What ``caption_files`` did: captions of the files it could read, and why it skipped the rest."""

    captions: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0


def caption_files(
    captioner: Captioner,
    files: Sequence[Path],
    *,
    gen: GenerateConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_caption: Callable[[Path, str], None] | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
    progress: bool = True,
) -> CaptionResult:
    """Caption image files with the one image reader, decoded as training decoded them (draft mode
    at the model's input side); unreadable files are skipped with the reason and the rest go on.

    ``on_caption`` / ``on_skip`` are called as each file is done (the CLI prints there).
    """
    from tqdm import tqdm

    gen = gen or captioner.gen
    result = CaptionResult()
    t0 = time.perf_counter()
    with tqdm(
        total=len(files),
        desc="captioning",
        unit="img",
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.1,
        disable=not progress,
    ) as bar:
        for batch in prefetched(list(files), gen.batch_size, captioner.image_reader(max_pixels)):
            good = [(f, im) for f, im in batch if not isinstance(im, BaseException)]
            for f, err in batch:
                if isinstance(err, BaseException):
                    reason = (
                        str(err) if isinstance(err, ImageReadError) else f"{f}: {type(err).__name__}: {err}"
                    )
                    result.skipped.append((f, reason))
                    if on_skip is not None:
                        on_skip(f, reason)
            if good:
                texts = captioner.caption([im for _, im in good], gen)
                for (f, _), text in zip(good, texts, strict=True):
                    result.captions.append((f, text))
                    if on_caption is not None:
                        on_caption(f, text)
            bar.update(len(batch))
    result.seconds = time.perf_counter() - t0
    return result


def write_captions_csv(path: Path, captions: Sequence[tuple[Path, str]]) -> None:
    """``file,caption`` rows, UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "caption"])
        w.writerows([str(f), text] for f, text in captions)


__all__ = ["CaptionResult", "caption_files", "collect_image_files", "write_captions_csv"]
