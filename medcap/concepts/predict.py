"""``medcap concepts predict``: the concepts of every image of a prepared split, written as the
ImageCLEFmedical concept-detection submission (``ID,CUIs``), its zip, and ``<split>.meta.json``.

Features come from the vision side the concept model was trained on (rebuilt from its config and
checked by fingerprint), or from a query cache of that vision side (``--query-cache``). An image that
cannot be read gets no concepts and a warning, so the file still has every ID."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.concepts.features import CachedFeatures, ConceptError, images_features, read_row_image
from medcap.concepts.model import ImageConcepts, load_concept_model, load_concept_predictor
from medcap.data.manifest import read_manifest
from medcap.layout import prediction_meta


@dataclass
class ConceptPredictResult:
    """What ``predict_concepts`` wrote and how it went."""

    submission: Path
    zip: Path
    meta: Path
    images: int
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    """Problems the submission check found (a bug if not empty)."""
    concepts: dict[str, ImageConcepts] = field(default_factory=dict)


def predict_concepts(
    checkpoint: str | Path,
    manifest: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    query_cache: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> ConceptPredictResult:
    """Predict the concepts of every row of ``manifest`` and write the submission ``out``."""
    from tqdm import tqdm

    from medcap.eval.concept_submission import inspect_concept_submission, write_concept_submission
    from medcap.eval.submission import zip_submission

    manifest, out = Path(manifest), Path(out)
    rows = read_manifest(manifest, limit=limit)
    if not rows:
        raise ConceptError(f"{manifest} has no rows")
    t0 = time.perf_counter()
    results: dict[str, ImageConcepts] = {}
    failed: list[str] = []
    bar = tqdm(
        total=len(rows),
        desc=f"concepts {split or manifest.parent.name}",
        unit="img",
        file=sys.stderr,
        disable=not progress,
    )
    batches = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
    if query_cache is not None:
        model = load_concept_model(checkpoint, device or "cpu")
        cache = CachedFeatures(query_cache, rows)
        if model.vision_fingerprint is not None and cache.fingerprint != model.vision_fingerprint:
            raise ConceptError(
                f"{query_cache} holds features of vision weights {cache.fingerprint}, the concept model was "
                f"trained on {model.vision_fingerprint}: use the cache it was trained from"
            )
        for idx, feats in zip(batches, cache.batches(batches), strict=True):
            for i, found in zip(idx, model.decide(model.probabilities(feats)), strict=True):
                results[rows[i].id] = found
            bar.update(len(idx))
        source = f"query cache {query_cache}"
    else:
        predictor = load_concept_predictor(checkpoint, device)
        model = predictor.concepts
        from medcap.model.families import family_of

        side = family_of(predictor.vision).image_side(predictor.processor)
        for idx in batches:
            good, images = [], []
            for i in idx:
                try:
                    images.append(read_row_image(rows[i], side))
                    good.append(i)
                except ConceptError as e:
                    failed.append(rows[i].id)
                    results[rows[i].id] = ImageConcepts([], [], None)
                    bar.write(f"warning: {e}", file=sys.stderr)
            if good:
                feats = images_features(predictor.vision, predictor.processor, images)
                for i, found in zip(good, model.decide(model.probabilities(feats)), strict=True):
                    results[rows[i].id] = found
            bar.update(len(idx))
        source = "vision tower"
    bar.close()
    seconds = time.perf_counter() - t0
    ids = [r.id for r in rows]
    write_concept_submission(out, ids, [results[i].cuis for i in ids], reference_ids=ids)
    zipped = zip_submission(out)
    meta: dict[str, Any] = {
        "task": "concepts",
        "split": split,
        "manifest": str(manifest),
        "images": len(rows),
        "unreadable": failed,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(rows) / seconds, 3) if seconds > 0 else None,
        "concept_model": str(model.checkpoint),
        "features": source,
        "vocabulary": len(model.vocab),
        "concepts_per_image": sum(len(r.cuis) for r in results.values()) / len(rows),
        "limit": limit,
    }
    meta_path = prediction_meta(out)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    check = inspect_concept_submission(out, ids, strict=True)
    return ConceptPredictResult(out, zipped, meta_path, len(rows), failed, seconds, check.errors, results)


__all__ = ["ConceptPredictResult", "predict_concepts"]
