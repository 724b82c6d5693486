"""Concept detection scored exactly as the ImageCLEFmedical 2025 evaluator scores it (FACTS 2b).

The evaluator (taubsity/clef-caption-evaluation, ``concept_detection/evaluator.py``) reads the
ground truth and the submission with Python's ``csv`` module and:

* skips every row whose first field contains ``ID`` (the header, wherever it is);
* takes the ID as written and the concepts as ``field.split(";")``, each stripped, so a row
  ``ID,`` holds one empty concept and ``ID`` alone holds none;
* refuses (with the line) a row of more than two fields, an ID not in the ground truth or given
  twice, more than 100 concepts, the same concept twice, and a file without every ground-truth ID;
* per image, upper-cases both sides and scores scikit-learn's ``f1_score(average="binary")`` over
  the sorted union of true and predicted concepts; the sum is divided by the number of images,
  less those whose ground truth is empty (none in the primary score: every ground-truth row holds
  at least one, possibly empty, concept);
* the secondary score does the same against ``*_concepts_manual.csv`` after keeping only
  ``MANUAL_CUIS`` on both sides; images left without a manual concept are not scored.

``score_concepts`` computes the per-image F1 as ``2 |P & G| / (|P| + |G|)`` on the upper-cased
sets, which is the binary F1 of those indicator vectors (``tests/eval/test_concepts.py`` checks it
against scikit-learn on the real validation concepts to 1e-9). ``evaluate_concepts`` writes
``metrics.json`` (means and bootstrap intervals), ``per_image.csv`` and ``per_concept.csv``.
The checks of a submission file (``medcap check-submission --task concepts``) are in
``medcap.eval.concept_submission``; both read rows with ``concept_rows``.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from medcap.data.tables import CsvError, iter_csv_records, read_csv_dicts
from medcap.eval.evaluate import EvaluationError
from medcap.layout import EvalLayout

#: The concepts of the secondary score (the 2025 evaluator's ``allowed_concepts``): the six
#: modalities, then body regions and the optical coherence tomography CUI added in 2025.
MANUAL_CUIS = frozenset(
    {
        "C0002978",  # angiogram
        "C0040405",  # X-Ray Computed Tomography
        "C0024485",  # Magnetic Resonance Imaging
        "C0032743",  # Positron-Emission Tomography
        "C0041618",  # Ultrasonography
        "C1306645",  # Plain x-ray
        "C1140618",  # Upper Extremity
        "C0037949",  # Vertebral column
        "C0030797",  # Pelvis
        "C0023216",  # Lower Extremity
        "C0037303",  # Bone structure of cranium
        "C0817096",  # Chest
        "C0006141",  # Breast
        "C0000726",  # Abdomen
        "C0920367",  # Optical Coherence Tomography
    }
)

#: Most concepts the evaluator takes for one image.
MAX_CONCEPTS = 100

#: A well-formed UMLS CUI (after the evaluator's strip and upper-casing).
CUI_PATTERN = re.compile(r"C\d{7}")


@dataclass
class ConceptRow:
    """One data row of a concepts file as the evaluator reads it."""

    line: int
    """Physical line (1-based, the header is line 1)."""
    fields: list[str]

    @property
    def id(self) -> str:
        return self.fields[0]

    @property
    def concepts(self) -> tuple[str, ...]:
        """``field.split(";")`` with each part stripped; ``()`` for a row with only an ID."""
        return split_concepts(self.fields)


def split_concepts(fields: Sequence[str]) -> tuple[str, ...]:
    """The evaluator's concepts of a row: ``fields[1].split(";")``, each stripped; ``()`` without one."""
    if len(fields) < 2:
        return ()
    return tuple(c.strip() for c in fields[1].split(";"))


def is_header(fields: Sequence[str]) -> bool:
    """The evaluator's header test, applied to every row: the first field contains ``ID``."""
    return bool(fields) and "ID" in fields[0]


def concept_rows(text: str, label: str) -> list[tuple[int, list[str]]]:
    """``(line, fields)`` of every record of CSV text, blank lines included (as ``[]``), through the
    one CSV reader. Raises ``CsvError`` for an unclosed quote."""
    return [(rec.line, rec.fields) for rec in iter_csv_records(text, label)]


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise EvaluationError(f"{what} {path} does not exist")
    try:
        # The evaluator opens with UTF-8 and keeps a BOM as part of the first field.
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{path}: not valid UTF-8 ({e}); save it as UTF-8") from None


def read_concept_references(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Ground-truth concepts ``{ID: concepts}`` read as the evaluator's ``load_gt`` reads them.

    ``path`` is a concepts CSV (``ID,CUIs``, the file the challenge scores against) or a prepared
    ``manifest.csv`` (its ``id`` and ``cuis`` columns). A later row of the same ID replaces the
    earlier one, as in the evaluator; a row with an ID and no concepts field is an error.
    """
    path = Path(path)
    text = _read_text(path, "references file")
    first = text.split("\n", 1)[0].lstrip("\ufeff").lower()
    if first.startswith("id,image,") or ",cuis," in first:  # a prepared manifest
        try:
            _, rows = read_csv_dicts(path)
        except CsvError as e:
            raise EvaluationError(str(e)) from None
        # A manifest's empty cuis means "no concepts" (prepare writes it so): the image is left out.
        return {r["id"]: tuple(c.strip() for c in r.get("cuis", "").split(";") if c.strip()) for _, r in rows}
    out: dict[str, tuple[str, ...]] = {}
    try:
        records = concept_rows(text, str(path))
    except CsvError as e:
        raise EvaluationError(str(e)) from None
    for line, fields in records:
        if not fields:
            raise EvaluationError(f"{path}, line {line}: blank line (the evaluator cannot read it)")
        if is_header(fields):
            continue
        if len(fields) < 2:
            raise EvaluationError(
                f"{path}, line {line}: an ID without a concepts field ({fields[0]!r}); the evaluator "
                "refuses such a ground truth ('Answer file format is wrong')"
            )
        out[fields[0]] = split_concepts(fields)
    return out


def manual_references_for(references: str | Path) -> Path | None:
    """The ``*_concepts_manual.csv`` that goes with a references file, when it exists.

    ``valid_concepts.csv`` -> ``valid_concepts_manual.csv`` beside it; a prepared
    ``PREP/valid/manifest.csv`` -> ``ROOT/valid_concepts_manual.csv`` of the dataset it was prepared
    from (``PREP/prepare.json`` names ``root``).
    """
    ref = Path(references)
    if ref.name.endswith("_concepts.csv"):
        cand = ref.with_name(ref.name.removesuffix("_concepts.csv") + "_concepts_manual.csv")
        return cand if cand.is_file() else None
    if ref.name == "concepts.csv":
        cand = ref.with_name("concepts_manual.csv")
        return cand if cand.is_file() else None
    summary = ref.parent.parent / "prepare.json"
    if ref.name == "manifest.csv" and summary.is_file():
        try:
            root = json.loads(summary.read_text(encoding="utf-8")).get("root")
        except ValueError:
            return None
        if root:
            from medcap.data.rocov2 import LayoutError, resolve_split

            try:
                return resolve_split(Path(root), ref.parent.name).concepts_manual
            except LayoutError:
                return None
    return None


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def image_f1(predicted: Iterable[str], truth: Iterable[str]) -> float:
    """Binary F1 of one image over the union of its (upper-cased) true and predicted concepts:
    ``2 |P & G| / (|P| + |G|)``. ``truth`` must hold at least one concept."""
    p = {c.upper() for c in predicted}
    g = {c.upper() for c in truth}
    return 2.0 * len(p & g) / (len(p) + len(g))


@dataclass
class ConceptScores:
    """Per-image F1 of one score (primary or secondary) and what it is divided by."""

    ids: list[str]
    """The scored images, in reference order (images whose ground truth is empty are left out)."""
    values: np.ndarray
    """F1 of each scored image (0 for a scored image the submission lacks)."""
    left_out: list[str] = field(default_factory=list)
    """Images not scored because their ground truth (after filtering) is empty."""

    @property
    def mean(self) -> float:
        return float(self.values.mean()) if len(self.values) else float("nan")


def score_concepts(
    predictions: Mapping[str, Sequence[str]],
    references: Mapping[str, Sequence[str]],
    keep: frozenset[str] | None = None,
) -> ConceptScores:
    """Per-image F1 as the evaluator computes it; ``keep`` filters both sides (the secondary score).

    The mean is the evaluator's score: the sum over scored images divided by the number of
    reference images less those left out. A reference image the predictions lack scores 0 (the
    secondary ground truth may hold images the primary lacks; the evaluator counts them so).
    """
    ids: list[str] = []
    values: list[float] = []
    left_out: list[str] = []
    for image_id, truth in references.items():
        g = {c.upper() for c in truth}
        pred = predictions.get(image_id)
        p = {c.upper() for c in pred} if pred is not None else set()
        if keep is not None:
            g &= keep
            p &= keep
        if pred is not None and not g:
            left_out.append(image_id)  # the evaluator lowers max_score only for predicted images
            continue
        ids.append(image_id)
        values.append(2.0 * len(p & g) / (len(p) + len(g)) if g else 0.0)
    return ConceptScores(ids, np.asarray(values, dtype=np.float64), left_out)


def per_concept_counts(
    predictions: Mapping[str, Sequence[str]], references: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, int]]:
    """``{CUI: {support, tp, fp, fn}}`` over the reference images (upper-cased, as scored)."""
    pairs = [
        ({c.upper() for c in truth}, {c.upper() for c in predictions.get(image_id, ())})
        for image_id, truth in references.items()
    ]
    support = Counter(chain.from_iterable(g for g, _ in pairs))
    tp = Counter(chain.from_iterable(g & p for g, p in pairs))
    fp = Counter(chain.from_iterable(p - g for g, p in pairs))
    return {
        c: {"support": support[c], "tp": tp[c], "fp": fp[c], "fn": support[c] - tp[c]}
        for c in support.keys() | fp.keys()
    }


def bootstrap_mean_ci(values: np.ndarray, samples: int, seed: int) -> list[float]:
    """Percentile 95% interval of the mean of ``values`` over ``samples`` resamples with replacement.

    Per-image F1 takes few distinct values (1, 0, 1/2, 2/3 ...), so a resample is drawn as how many
    times each distinct value comes up (one multinomial draw over them): the same distribution as
    drawing n image indices, in a few milliseconds for 10,000 images instead of a quarter second."""
    n = len(values)
    distinct, counts = np.unique(values, return_counts=True)
    rng = np.random.default_rng(seed)
    means = rng.multinomial(n, counts / n, size=samples) @ distinct / n
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------
# Evaluation with intervals
# ---------------------------------------------------------------------------------------------


def read_concept_predictions(path: str | Path, reference_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """A submission read as the evaluator reads it; what it refuses raises ``EvaluationError``
    with the row and the reason (``medcap check-submission --task concepts`` lists every one)."""
    from medcap.eval.concept_submission import inspect_concept_submission

    check = inspect_concept_submission(path, reference_ids)
    if not check.ok:
        raise EvaluationError(
            f"{path}: the ImageCLEFmedical evaluator refuses this submission:\n  " + "\n  ".join(check.errors)
        )
    return check.predictions


def evaluate_concepts(
    predictions: str | Path,
    references: str | Path,
    out_dir: str | Path,
    *,
    manual_references: str | Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a concept-detection submission; write ``metrics.json``, ``per_image.csv`` and
    ``per_concept.csv`` in ``out_dir`` and return the summary.

    ``manual_references`` defaults to ``manual_references_for(references)``; without it the
    secondary score is listed as unavailable with the reason.
    """
    pred_path, ref_path, out = Path(predictions), Path(references), Path(out_dir)
    refs = read_concept_references(ref_path)
    if not refs:
        raise EvaluationError(f"{ref_path}: no ground-truth rows")
    preds = read_concept_predictions(pred_path, list(refs))
    manual_path = Path(manual_references) if manual_references else manual_references_for(ref_path)
    primary = score_concepts(preds, refs)
    metrics: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    notes = [
        "f1: per-image F1 over the union of true and predicted concepts (upper-cased), summed and "
        f"divided by the {len(primary.ids)} images with ground-truth concepts",
    ]
    secondary: ConceptScores | None = None
    manual: dict[str, tuple[str, ...]] = {}
    if manual_path is not None:
        manual = read_concept_references(manual_path)
        missing = [i for i in preds if i not in manual]
        if missing:
            raise EvaluationError(
                f"{manual_path}: {len(missing)} submitted IDs have no manual ground truth (e.g. "
                f"{', '.join(missing[:3])}); the evaluator needs one for every image"
            )
        secondary = score_concepts(preds, manual, MANUAL_CUIS)
        notes.append(
            f"f1_manual: the same against {manual_path.name}, keeping only the {len(MANUAL_CUIS)} manually "
            f"curated CUIs on both sides; {len(secondary.left_out)} images without one are left out"
        )
    else:
        unavailable["f1_manual"] = (
            "no manual concepts file (*_concepts_manual.csv) was found next to the references; pass "
            "--manual-references"
        )
    rng_values = [("f1", primary)] + ([("f1_manual", secondary)] if secondary is not None else [])
    for k, (name, scores) in enumerate(rng_values):
        entry: dict[str, Any] = {"mean": scores.mean, "n": len(scores.ids)}
        if bootstrap > 0 and len(scores.values):
            entry["ci95"] = bootstrap_mean_ci(scores.values, bootstrap, seed + k)
        metrics[name] = entry
    counts = per_concept_counts(preds, refs)
    n_pred = sum(len(set(p)) for p in preds.values())
    summary: dict[str, Any] = {
        "task": "concepts",
        "protocol": "imageclef2025-concepts",
        "description": (
            "ImageCLEFmedical 2025 concept detection: per-image F1 (scikit-learn binary F1 over the "
            "union of true and predicted CUIs, upper-cased), averaged over images with ground-truth "
            "concepts; secondary the same on the 15 manually curated CUIs (*_concepts_manual.csv)"
        ),
        "primary": "f1",
        "secondary": "f1_manual",
        "n": len(preds),
        "n_references": len(refs),
        "n_scored": len(primary.ids),
        "predictions": str(pred_path.resolve()),
        "references": str(ref_path.resolve()),
        "manual_references": str(manual_path.resolve()) if manual_path is not None else None,
        "metrics": metrics,
        "concepts": {
            "predicted_per_image": n_pred / max(len(preds), 1),
            "true_per_image": sum(len(set(g)) for g in refs.values()) / len(refs),
            "distinct_true": sum(1 for v in counts.values() if v["support"]),
            "distinct_predicted": sum(1 for v in counts.values() if v["tp"] + v["fp"]),
        },
        "unavailable": unavailable,
        "bootstrap": {"samples": bootstrap, "seed": seed, "interval": "percentile 95%"},
        "notes": notes,
    }
    layout = EvalLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    layout.metrics.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _write_per_image(layout.per_image, refs, preds, primary, secondary)
    _write_per_concept(layout.per_concept, counts)
    return summary


def _write_per_image(
    path: Path,
    refs: Mapping[str, Sequence[str]],
    preds: Mapping[str, Sequence[str]],
    primary: ConceptScores,
    secondary: ConceptScores | None,
) -> None:
    f1 = dict(zip(primary.ids, primary.values.tolist(), strict=True))
    f1m = dict(zip(secondary.ids, secondary.values.tolist(), strict=True)) if secondary else {}
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "true", "predicted", "f1", "f1_manual"])
        for image_id, truth in refs.items():
            w.writerow(
                [
                    image_id,
                    ";".join(truth),
                    ";".join(preds.get(image_id, ())),
                    f"{f1[image_id]:.10f}" if image_id in f1 else "",
                    f"{f1m[image_id]:.10f}" if image_id in f1m else "",
                ]
            )


def _write_per_concept(path: Path, counts: Mapping[str, Mapping[str, int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["cui", "support", "tp", "fp", "fn", "precision", "recall", "f1"])
        for cui, c in sorted(counts.items(), key=lambda kv: (-kv[1]["support"], kv[0])):
            tp, fp, fn = c["tp"], c["fp"], c["fn"]
            prec = tp / (tp + fp) if tp + fp else 0.0
            rec = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            w.writerow([cui, c["support"], tp, fp, fn, f"{prec:.6f}", f"{rec:.6f}", f"{f1:.6f}"])


def format_concept_summary(summary: Mapping[str, Any]) -> str:
    """A readable table of a concepts ``metrics.json``."""
    lines = [f"concept detection: {summary['n']} images, {summary['n_scored']} with ground-truth concepts"]
    for m, e in summary["metrics"].items():
        role = " (primary)" if m == summary.get("primary") else " (secondary)"
        ci = f"  95% CI [{e['ci95'][0]:.4f}, {e['ci95'][1]:.4f}]" if "ci95" in e else ""
        lines.append(f"  {m:<10} {e['mean']:.4f}{ci}  over {e['n']} images{role}")
    c = summary.get("concepts") or {}
    if c:
        lines.append(
            f"  concepts per image: predicted {c['predicted_per_image']:.2f}, true {c['true_per_image']:.2f}"
        )
    for m, why in (summary.get("unavailable") or {}).items():
        lines.append(f"  {m}: not computed ({why})")
    return "\n".join(lines)


__all__ = [
    "CUI_PATTERN",
    "MANUAL_CUIS",
    "MAX_CONCEPTS",
    "ConceptRow",
    "ConceptScores",
    "concept_rows",
    "evaluate_concepts",
    "format_concept_summary",
    "image_f1",
    "is_header",
    "manual_references_for",
    "per_concept_counts",
    "read_concept_predictions",
    "read_concept_references",
    "score_concepts",
    "split_concepts",
]
