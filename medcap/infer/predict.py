"""``medcap predict``: caption every image of a prepared split and write the ImageCLEFmedical submission.

``predict(captioner, manifest, out)`` reads the split with the one image reader (draft-mode decode
at the model's input side, as training did), captions it in batches while the next batch decodes,
and writes ``out`` (``ID,Caption`` in manifest order), a zip holding it as ``submission.csv`` (what
the challenge site takes) and ``<split>.meta.json`` (model, decoding, timing, unreadable IDs), then
checks the file as ``medcap check-submission`` would. An image that cannot be read gets an empty
caption and a warning, so the file still has every ID.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medcap.config.data import DataConfig
from medcap.config.generate import GenerateConfig
from medcap.config.run import RunConfig
from medcap.data.manifest import read_manifest
from medcap.infer.generate import Captioner, prefetched
from medcap.layout import prediction_meta


class PredictError(RuntimeError):
    """Predictions cannot be made; the message says why and what to do."""


@dataclass
class PredictResult:
    """What ``predict`` wrote and how it went."""

    submission: Path
    zip: Path
    meta: Path
    images: int
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    """Problems the submission check found (a bug if not empty: the writer made an invalid file)."""


def prepared_of_run(run_cfg: RunConfig | None, ckpt: Path | None, split: str) -> Path:
    """The checkpoint's ``data.prepared``. A relative path was relative to where training ran: try the
    current folder first, then the folders above the checkpoint (so it works from anywhere)."""
    prepared = Path(run_cfg.data.prepared if run_cfg is not None else DataConfig().prepared)
    if prepared.is_absolute() or ckpt is None:
        return prepared
    for base in [Path.cwd(), *ckpt.resolve().parents]:
        if DataConfig(prepared=base / prepared).manifest(split).is_file():
            return base / prepared
    return prepared


def predict(
    captioner: Captioner,
    manifest: str | Path,
    out: str | Path,
    *,
    gen: GenerateConfig | None = None,
    limit: int | None = None,
    split: str | None = None,
    progress: bool = True,
) -> PredictResult:
    """Caption every image of ``manifest`` (a prepared split) and write the submission ``out``.

    ``gen`` defaults to the captioner's decoding settings (the checkpoint's ``generate`` section).
    ``limit`` captions only the first N rows (a quick look, not a submission).
    """
    from tqdm import tqdm

    from medcap.eval.submission import check_submission, write_submission, zip_submission

    gen = gen or captioner.gen
    manifest, out = Path(manifest), Path(out)
    rows = read_manifest(manifest, limit=limit)
    if not rows:
        raise PredictError(f"{manifest} has no rows")
    captions: dict[str, str] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    with tqdm(
        total=len(rows),
        desc=f"predict {split or manifest.parent.name}",
        unit="img",
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.1,
        disable=not progress,
    ) as bar:
        read = captioner.image_reader()  # the same draft-mode decode as training
        for batch in prefetched(rows, gen.batch_size, lambda r: read(r.image)):
            good = [(r, im) for r, im in batch if not isinstance(im, BaseException)]
            for r, err in batch:
                if isinstance(err, BaseException):
                    # The submission needs every ID: an unreadable image gets an empty caption.
                    captions[r.id] = ""
                    failed.append(r.id)
                    bar.write(f"warning: {r.id}: {r.image}: {type(err).__name__}: {err}", file=sys.stderr)
            if good:
                for (r, _), text in zip(good, captioner.caption([im for _, im in good], gen), strict=True):
                    captions[r.id] = text
            bar.update(len(batch))
    seconds = time.perf_counter() - t0

    ids = [r.id for r in rows]
    write_submission(out, ids, [captions[i] for i in ids], reference_ids=ids)
    zipped = zip_submission(out)
    meta: dict[str, Any] = {
        "split": split,
        "manifest": str(manifest),
        "images": len(rows),
        "unreadable": failed,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(rows) / seconds, 3) if seconds > 0 else None,
        "model": captioner.info,
        "family": captioner.family.name,
        "prompt": captioner.prompt,
        "generate": asdict(gen),
        "limit": limit,
    }
    meta_path = prediction_meta(out)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    errors = check_submission(out, ids)
    return PredictResult(out, zipped, meta_path, len(rows), failed, seconds, errors)


__all__ = ["PredictError", "PredictResult", "predict", "prepared_of_run"]
