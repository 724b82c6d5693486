"""Evaluation: score a submission against references, bootstrap intervals, compare two runs.

``medcap evaluate --predictions FILE --references CSV --protocol imageclef2024|imageclef2025|coco``
reads predictions in the submission format (``ID,Caption``; also TSV and JSON Lines, see
``medcap.eval.predictions``) and references (a ROCOv2 captions CSV
``ID,Caption`` or a prepared ``manifest.csv`` with ``id,caption,image``), pairs them by ID and
writes ``OUT/metrics.json`` (means, bootstrap 95% intervals, protocol, models, unavailable metrics
with reasons) and ``OUT/per_caption.csv`` (one row per pair, one column per metric).

``medcap compare RUN_A RUN_B`` runs a paired bootstrap on the per-caption scores of two
evaluations: the mean difference, its 95% interval, a p-value, how often A came out ahead, and a
plain-language verdict per metric.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcap.data.tables import CsvError, read_csv_dicts
from medcap.eval.bertscore import resolve_bertscore_model
from medcap.eval.errors import EvaluationError
from medcap.eval.metrics import MetricsConfig, score_captions
from medcap.eval.predictions import read_predictions
from medcap.layout import EvalLayout


@dataclass(frozen=True)
class Protocol:
    """How one benchmark scores captions."""

    name: str
    metrics: tuple[str, ...]
    preprocess: bool
    ptb_tokenize: bool
    bertscore_idf: bool
    primary: str
    secondary: str | None
    description: str
    not_offline: dict[str, str] = field(default_factory=dict)
    """Official metrics this package cannot compute offline, with the reason."""


PROTOCOLS: dict[str, Protocol] = {
    "imageclef2024": Protocol(
        name="imageclef2024",
        metrics=("bertscore", "rouge1", "bleu", "meteor", "cider", "bleurt", "clipscore", "refclipscore"),
        preprocess=True,
        ptb_tokenize=False,
        bertscore_idf=False,
        primary="bertscore",
        secondary="rouge1",
        description=(
            "ImageCLEFmedical Caption 2023/2024: official preprocessing, scores per caption pair "
            "and averaged; primary BERTScore F1 (deberta-xlarge-mnli, no idf, no rescaling), "
            "secondary ROUGE-1 F. BLEU-n, METEOR and CIDEr on the preprocessed text (whitespace "
            "tokens). BLEU per caption is the sentence BLEU; corpus BLEU is listed separately."
        ),
        not_offline={
            "clinicalbleurt": "ClinicalBLEURT checkpoint is not distributed offline",
            "medbertscore": "MedBERTScore needs a medical BERT checkpoint that is not available offline",
        },
    ),
    "imageclef2025": Protocol(
        name="imageclef2025",
        metrics=("bertscore", "rouge1", "similarity", "bleurt"),
        preprocess=True,
        ptb_tokenize=False,
        bertscore_idf=True,
        primary="relevance",
        secondary="factuality",
        description=(
            "ImageCLEFmedical Caption 2025: relevance = mean(BERTScore F1 with idf from the "
            "preprocessed references, ROUGE-1 F, image-caption similarity 2.5*max(cos,0)); "
            "factuality = mean(UMLS-concept F1 by MedCAT, AlignScore); BLEURT on the side."
        ),
        not_offline={
            "medcat": "MedCAT needs a licensed UMLS model pack, which cannot be obtained offline",
            "alignscore": "AlignScore needs the alignscore package and its checkpoint, not available offline",
            "factuality": "needs MedCAT and AlignScore (both unavailable)",
        },
    ),
    "coco": Protocol(
        name="coco",
        metrics=("bleu", "meteor", "rougeL", "cider", "bertscore"),
        preprocess=False,
        ptb_tokenize=True,
        bertscore_idf=False,
        primary="cider",
        secondary="bleu4",
        description=(
            "COCO caption evaluation (pycocoevalcap): PTB tokenisation, BLEU-1..4, METEOR, "
            "ROUGE-L, CIDEr-D; plus BERTScore F1 on the raw captions. Per-caption values are the "
            "library's per-image scores; corpus BLEU is listed separately."
        ),
    ),
}


def read_references(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Read references: a captions CSV (``ID,Caption``) or a prepared ``manifest.csv``.

    Returns ``({id: caption}, {id: image path})``; the image map is empty for a captions CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"references file {path} does not exist")
    captions: dict[str, str] = {}
    images: dict[str, str] = {}
    try:
        header, rows = read_csv_dicts(path)
    except CsvError as e:
        raise EvaluationError(str(e)) from None
    fields = {name.strip().lower(): name for name in header}
    if "id" not in fields or "caption" not in fields:
        raise EvaluationError(
            f"{path}: expected a header with ID and Caption columns (a ROCOv2 captions CSV or a "
            f"prepared manifest.csv), found {header}"
        )
    id_col, cap_col, img_col = fields["id"], fields["caption"], fields.get("image")
    for rowno, rec in rows:
        image_id = (rec.get(id_col) or "").strip()
        if not image_id:
            raise EvaluationError(f"{path}, row {rowno}: empty ID")
        if image_id in captions:
            raise EvaluationError(f"{path}, row {rowno}: image ID {image_id!r} appears more than once")
        captions[image_id] = rec.get(cap_col) or ""
        if img_col and rec.get(img_col):
            images[image_id] = rec[img_col]
    return captions, images


def _pair_up(preds: dict[str, str], refs: dict[str, str], pred_path: Path, subset: bool) -> list[str]:
    """IDs to score, in reference order; clear errors for missing or extra IDs."""
    extra = [i for i in preds if i not in refs]
    if extra:
        raise EvaluationError(
            f"{pred_path}: {len(extra)} prediction ID(s) are not in the references, e.g. "
            f"{', '.join(extra[:5])}; check that both files are for the same split"
        )
    missing = [i for i in refs if i not in preds]
    if missing and not subset:
        raise EvaluationError(
            f"{pred_path}: {len(missing)} reference ID(s) have no prediction, e.g. {', '.join(missing[:5])}; "
            "every ID needs exactly one caption (or pass --subset to score only the predicted IDs)"
        )
    return [i for i in refs if i in preds]


def bootstrap_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Means of ``samples`` resamples (with replacement) of each column of ``values`` (n x k).

    The same resampled rows are used for every column, so differences between columns are paired.
    """
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((samples, values.shape[1]))
    chunk = max(1, 2_000_000 // max(n, 1))  # bound memory: chunk x n indices at a time
    for s in range(0, samples, chunk):
        k = min(chunk, samples - s)
        idx = rng.integers(0, n, size=(k, n))
        out[s : s + k] = values[idx].mean(axis=1)
    return out


def _ci(boot: np.ndarray) -> list[float]:
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return [float(lo), float(hi)]


@dataclass
class PairScores:
    """Per-caption scores of one protocol, as ``medcap evaluate`` writes them to per_caption.csv."""

    per_caption: dict[str, list[float]]
    """``{column: [score of pair 0, pair 1, ...]}`` in the protocol's column names (``similarity``,
    ``relevance`` for imageclef2025)."""
    unavailable: dict[str, str]
    """Metrics that could not be computed, with the reason."""
    notes: list[str]
    """What a reader of the figures should know (how relevance was formed, the similarity model)."""
    corpus: dict[str, float]
    """Corpus-level values that are not means of the per-caption ones (corpus BLEU)."""
    models: dict[str, str]
    """Which model and settings produced each model-based metric."""


def protocol_columns(protocol: str) -> tuple[str, ...]:
    """The per-caption columns ``medcap evaluate`` can write under ``protocol`` (bleu as bleu1..bleu4,
    imageclef2025's CLIPScore as ``similarity`` plus the derived ``relevance``)."""
    proto = PROTOCOLS[protocol]
    metric_names = ["clipscore" if m == "similarity" else m for m in proto.metrics]
    columns = [
        "similarity" if (m == "clipscore" and protocol == "imageclef2025") else m
        for m in MetricsConfig(metrics=metric_names).expanded_metrics()
    ]
    if protocol == "imageclef2025":
        columns.append("relevance")
    return tuple(columns)


#: What a column is computed from, where that is more than the metric of the same name.
_COLUMN_SOURCES = {
    "relevance": ("bertscore", "rouge1", "similarity"),
    **{f"bleu{k}": ("bleu",) for k in range(1, 5)},
}


def score_pairs(
    predictions: list[str],
    references: list[str],
    protocol: str,
    *,
    only: tuple[str, ...] | None = None,
    images: list[str] | None = None,
    idf_references: list[str] | None = None,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    bertscore: Any = None,
    bleurt_model: str | None = None,
    clip_model: str | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> PairScores:
    """Score caption pairs as ``protocol`` does: the core of ``evaluate`` (which adds reading the
    files, bootstrap intervals and writing them), also used to choose checkpoints during training
    (``train.select_by``), so that both give the same figures.

    ``only`` limits the work to the columns named and what they are computed from (``relevance``
    needs bertscore, rouge1 and similarity); every column is computed pair by pair, so a limited call
    gives the same values as a full one. ``idf_references`` are the sentences BERTScore's idf comes
    from when the protocol uses idf (the official 2025 evaluator: every ground-truth caption).
    ``bertscore`` reuses an already loaded ``BertScoreExact``.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    metric_names = ["clipscore" if m == "similarity" else m for m in proto.metrics]
    if only is not None:
        unknown = [c for c in only if c not in protocol_columns(protocol)]
        if unknown:
            raise EvaluationError(
                f"{', '.join(unknown)} is not a column of protocol {protocol}; it has "
                f"{', '.join(protocol_columns(protocol))}"
            )
        needed = {s for c in only for s in _COLUMN_SOURCES.get(c, (c,))}
        needed = {"clipscore" if m == "similarity" else m for m in needed}
        metric_names = [m for m in metric_names if m in needed]
    cfg = MetricsConfig(
        metrics=metric_names,
        preprocess=proto.preprocess,
        ptb_tokenize=proto.ptb_tokenize,
        bertscore_idf=proto.bertscore_idf,
        bertscore_layers=bertscore_layers,
        bleurt_model=bleurt_model,
        clip_model=clip_model,
        device=device,
        show_progress=show_progress,
    )
    if bertscore_model:
        cfg.bertscore_model = bertscore_model
    scores = score_captions(
        predictions, references, cfg, images=images, idf_references=idf_references, bertscore=bertscore
    )
    per_caption: dict[str, list[float]] = {}
    for m, values in scores.items():
        per_caption["similarity" if (m == "clipscore" and protocol == "imageclef2025") else m] = values
    unavailable = {
        ("similarity" if (m == "clipscore" and protocol == "imageclef2025") else m): r
        for m, r in scores.unavailable.items()
    }
    unavailable.update(proto.not_offline)
    notes: list[str] = []
    if protocol == "imageclef2025":
        parts = [m for m in ("bertscore", "rouge1", "similarity") if m in per_caption]
        missing = [m for m in ("bertscore", "rouge1", "similarity") if m not in per_caption]
        if parts:
            per_caption["relevance"] = list(np.mean([per_caption[m] for m in parts], axis=0))
            notes.append(
                f"relevance = mean of {', '.join(parts)}"
                + (
                    f"; missing {', '.join(missing)}, so it is NOT comparable to the official relevance"
                    if missing
                    else ""
                )
            )
            if "similarity" in per_caption:
                notes.append(
                    f"similarity uses {clip_model} with the official formula 2.5*max(cos,0); the "
                    "official evaluator uses MedImageInsight, so values differ"
                )
        else:
            unavailable["relevance"] = "none of its parts could be computed"

    return PairScores(per_caption, unavailable, notes, scores.corpus, scores.models)


def evaluate(
    predictions: str | Path,
    references: str | Path,
    protocol: str,
    out_dir: str | Path,
    *,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    bleurt_model: str | None = None,
    clip_model: str | None = None,
    images_dir: str | Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    subset: bool = False,
    device: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score ``predictions`` against ``references`` with ``protocol``; write metrics.json and per_caption.csv.

    Returns the summary written to ``out_dir/metrics.json``.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    pred_path, ref_path, out = Path(predictions), Path(references), Path(out_dir)
    bertscore_model, bertscore_layers = resolve_bertscore_model(bertscore_model, bertscore_layers)
    preds = read_predictions(pred_path)
    refs, ref_images = read_references(ref_path)
    ids = _pair_up(preds, refs, pred_path, subset)
    if not ids:
        raise EvaluationError(f"{pred_path}: no prediction matches a reference ID")

    images: list[str] | None = None
    if images_dir is not None:
        images = []
        for i in ids:
            hits = [
                p
                for p in (Path(images_dir) / f"{i}{ext}" for ext in (".jpg", ".jpeg", ".png"))
                if p.is_file()
            ]
            if not hits:
                raise EvaluationError(
                    f"no image for ID {i!r} in {images_dir} (looked for {i}.jpg/.jpeg/.png)"
                )
            images.append(str(hits[0]))
    elif ref_images and all(i in ref_images for i in ids):
        images = [ref_images[i] for i in ids]

    scores = score_pairs(
        [preds[i] for i in ids],
        [refs[i] for i in ids],
        protocol,
        images=images,
        # The official 2025 evaluator takes idf weights from every ground-truth caption.
        idf_references=list(refs.values()),
        bertscore_model=bertscore_model,
        bertscore_layers=bertscore_layers,
        bleurt_model=bleurt_model,
        clip_model=clip_model,
        device=device,
        show_progress=show_progress,
    )
    per_caption, unavailable, notes = scores.per_caption, scores.unavailable, list(scores.notes)

    n = len(ids)
    names = list(per_caption)
    summary_metrics: dict[str, Any] = {}
    if names:
        matrix = np.array([per_caption[m] for m in names], dtype=float).T
        boot = bootstrap_means(matrix, bootstrap, seed) if bootstrap > 0 else None
        for k, m in enumerate(names):
            entry: dict[str, Any] = {"mean": float(matrix[:, k].mean())}
            if boot is not None:
                entry["ci95"] = _ci(boot[:, k])
            summary_metrics[m] = entry
    for m, v in scores.corpus.items():
        notes.append(f"{m}: corpus-level BLEU (n-gram counts pooled over all captions) = {v:.6f}")

    summary: dict[str, Any] = {
        "protocol": protocol,
        "description": proto.description,
        "primary": proto.primary,
        "secondary": proto.secondary,
        "n": n,
        "n_references": len(refs),
        "subset": bool(subset and n < len(refs)),
        "predictions": str(pred_path.resolve()),
        "references": str(ref_path.resolve()),
        "metrics": summary_metrics,
        "corpus": scores.corpus,
        "models": scores.models,
        "unavailable": unavailable,
        "bootstrap": {"samples": bootstrap, "seed": seed, "interval": "percentile 95%"},
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    (EvalLayout(out).metrics).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with EvalLayout(out).per_caption.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "reference", "prediction", *names])
        for row, i in enumerate(ids):
            w.writerow([i, refs[i], preds[i], *(f"{per_caption[m][row]:.8f}" for m in names)])
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table of a ``metrics.json`` summary."""
    lines = [f"protocol {summary['protocol']}: {summary['n']} caption pairs"]
    for m, e in summary["metrics"].items():
        star = (
            " (primary)"
            if m == summary.get("primary")
            else " (secondary)"
            if m == summary.get("secondary")
            else ""
        )
        ci = f"  95% CI [{e['ci95'][0]:.4f}, {e['ci95'][1]:.4f}]" if "ci95" in e else ""
        lines.append(f"  {m:<15} {e['mean']:.4f}{ci}{star}")
    for m, why in summary.get("unavailable", {}).items():
        lines.append(f"  {m:<15} unavailable: {why}")
    for note in summary.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)
