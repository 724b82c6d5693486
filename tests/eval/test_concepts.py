"""Concept detection scored as the ImageCLEFmedical 2025 evaluator scores it: equal to an independent
computation with scikit-learn on the real ROCOv2 validation concepts (shuffled and perturbed
predictions, 1e-9), each of the evaluator's rules, and the checker's refusals with their rows."""

from __future__ import annotations

import csv
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medcap.cli.eval import cmd_check_submission, cmd_evaluate
from medcap.eval.concept_submission import inspect_concept_submission, write_concept_submission
from medcap.eval.concepts import (
    MANUAL_CUIS,
    evaluate_concepts,
    read_concept_references,
    score_concepts,
)
from medcap.eval.evaluate import EvaluationError
from tests.fixtures import skip_missing

SHARED = Path(__file__).resolve().parents[3] / "shared"
VALID = SHARED / "data" / "rocov2-valid"


def _official_rows(path: Path) -> dict[str, tuple[str, ...]]:
    """The evaluator's load_gt, written out here on its own (csv module, no medcap code)."""
    out: dict[str, tuple[str, ...]] = {}
    with path.open(encoding="utf-8") as f:
        for row in csv.reader(f):
            if "ID" in row[0]:
                continue
            out[row[0]] = tuple(c.strip() for c in row[1].split(";")) if len(row) > 1 else ()
    return out


def _sklearn_mean(preds: dict, truth: dict, keep: frozenset | None = None) -> float:
    """Mean per-image F1 by scikit-learn's sample-averaged F1 on indicator matrices (independent of
    medcap's formula), over the images whose (filtered) ground truth is not empty."""
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    ids, y_true, y_pred = [], [], []
    for i, g in truth.items():
        g = {c.upper() for c in g}
        p = {c.upper() for c in preds[i]}
        if keep is not None:
            g, p = g & keep, p & keep
        if g:
            ids.append(i)
            y_true.append(sorted(g))
            y_pred.append(sorted(p))
    mlb = MultiLabelBinarizer(sparse_output=True).fit(y_true + y_pred)
    return float(f1_score(mlb.transform(y_true), mlb.transform(y_pred), average="samples"))


def _binary_f1(pred, truth, keep=None) -> float | None:
    """The evaluator's per-image computation, literally: binary F1 over the sorted union."""
    from sklearn.metrics import f1_score

    p = tuple(c.upper() for c in pred)
    g = tuple(c.upper() for c in truth)
    if keep is not None:
        p, g = tuple(c for c in p if c in keep), tuple(c for c in g if c in keep)
    if not g:
        return None
    union = sorted(set(g + p))
    return float(f1_score([int(c in g) for c in union], [int(c in p) for c in union], average="binary"))


def _write_rows(path: Path, rows: list[list[str]], header: bool = True) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if header:
            w.writerow(["ID", "CUIs"])
        w.writerows(rows)
    return path


def _perturbed(truth: dict[str, tuple[str, ...]], seed: int) -> dict[str, tuple[str, ...]]:
    """Predictions near the truth: concepts dropped, others added, case and spaces changed, some
    images with nothing, some with the truth of another image."""
    rng = random.Random(seed)
    pool = sorted({c for g in truth.values() for c in g})
    ids = list(truth)
    out = {}
    for i in ids:
        r = rng.random()
        if r < 0.05:
            out[i] = ()
        elif r < 0.15:
            out[i] = truth[rng.choice(ids)]
        else:
            kept = [c for c in truth[i] if rng.random() < 0.7]
            kept += rng.sample(pool, rng.randint(0, 3))
            kept = list(dict.fromkeys(kept))
            out[i] = tuple(
                (c.lower() if rng.random() < 0.1 else c) + (" " if rng.random() < 0.1 else "") for c in kept
            )
    return out


@pytest.fixture(scope="module")
def real() -> tuple[Path, Path]:
    concepts, manual = VALID / "valid_concepts.csv", VALID / "valid_concepts_manual.csv"
    if not concepts.is_file() or not manual.is_file():
        skip_missing(f"the real ROCOv2 validation concepts are not in {VALID}")
    return concepts, manual


@pytest.mark.parametrize("kind", ["truth", "shuffled", "perturbed"])
def test_scores_equal_an_independent_sklearn_computation_on_the_real_validation_concepts(
    real: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    concepts, manual = real
    truth = _official_rows(concepts)
    manual_truth = _official_rows(manual)
    assert len(truth) == 9904
    ids = list(truth)
    if kind == "truth":
        preds = dict(truth)
    elif kind == "shuffled":
        order = ids[:]
        random.Random(1).shuffle(order)
        preds = {i: truth[j] for i, j in zip(ids, order, strict=True)}
    else:
        preds = _perturbed(truth, seed=2)
    rows = [[i, ";".join(preds[i])] if preds[i] else [i] for i in ids]
    random.Random(3).shuffle(rows)  # the evaluator does not care about the order
    sub = _write_rows(tmp_path / "submission.csv", rows)

    preds = _official_rows(sub)  # what the evaluator reads back (stripped concepts)
    summary = evaluate_concepts(sub, concepts, tmp_path / "eval", bootstrap=200)
    assert summary["manual_references"] == str(manual.resolve())  # found next to the references
    want = _sklearn_mean(preds, truth)
    want_manual = _sklearn_mean(preds, manual_truth, MANUAL_CUIS)
    assert summary["metrics"]["f1"]["mean"] == pytest.approx(want, abs=1e-9)
    assert summary["metrics"]["f1_manual"]["mean"] == pytest.approx(want_manual, abs=1e-9)
    if kind == "truth":
        assert summary["metrics"]["f1"]["mean"] == pytest.approx(1.0, abs=1e-12)
    lo, hi = summary["metrics"]["f1"]["ci95"]
    assert lo <= summary["metrics"]["f1"]["mean"] <= hi

    # Per image, the literal binary F1 over the sorted union on a sample of 100 images.
    per_image = {
        r["id"]: r for r in csv.DictReader((tmp_path / "eval" / "per_image.csv").open(encoding="utf-8"))
    }
    for i in random.Random(4).sample(ids, 100):
        f1 = _binary_f1(preds[i], truth[i])
        assert float(per_image[i]["f1"]) == pytest.approx(f1, abs=1e-9)
        f1m = _binary_f1(preds[i], manual_truth[i], MANUAL_CUIS)
        assert (per_image[i]["f1_manual"] == "") == (f1m is None)
        if f1m is not None:
            assert float(per_image[i]["f1_manual"]) == pytest.approx(f1m, abs=1e-9)


def test_images_without_ground_truth_concepts_are_left_out_not_scored_one(tmp_path: Path) -> None:
    # Secondary: image a has no manual CUI (left out), b scores 0.5: the mean is 0.5, not 0.75
    # (a counted as 1) nor 0.25 (a counted as 0).
    truth = {"a": ("C0000001",), "b": ("C0040405", "C0817096")}
    preds = {"a": ("C0040405",), "b": ("C0040405", "C0000726")}
    scores = score_concepts(preds, truth, MANUAL_CUIS)
    assert scores.left_out == ["a"] and scores.mean == pytest.approx(0.5)
    # Primary: a scores 0 (a wrong concept), b 0.5; union and case: c and C are one concept.
    assert score_concepts(preds, truth).mean == pytest.approx(0.25)
    assert score_concepts({"a": ("c0000001",)}, {"a": ("C0000001 ",)}).mean == 0.0  # strip is the reader's
    assert score_concepts({"a": ("c0000001",)}, {"a": ("C0000001",)}).mean == 1.0


def test_an_id_with_a_trailing_comma_is_one_empty_concept_as_the_evaluator_reads_it(tmp_path: Path) -> None:
    refs = _write_rows(tmp_path / "valid_concepts.csv", [["x1", "C0040405"], ["x2", "C0040405"]])
    sub = tmp_path / "sub.csv"
    sub.write_text("ID,CUIs\nx1,C0040405\nx2,\n", encoding="utf-8")
    check = inspect_concept_submission(sub, refs)
    assert check.ok and check.predictions["x2"] == ("",)
    assert any("row 3" in w and "empty concept" in w for w in check.warnings)
    assert not inspect_concept_submission(sub, refs, strict=True).ok
    summary = evaluate_concepts(sub, refs, tmp_path / "eval", bootstrap=0)
    # x2: predicted {""} against {C0040405}: F1 0; x1: 1 -> 0.5 (the ID alone would also give 0).
    assert summary["metrics"]["f1"]["mean"] == pytest.approx(0.5)
    assert summary["unavailable"]["f1_manual"].startswith("no manual concepts file")


REFS = [[f"img{i}", "C0040405;C0817096"] for i in range(4)]


@pytest.mark.parametrize(
    ("body", "row", "words"),
    [
        ("img0,C0040405\n\nimg1\nimg2\nimg3\n", 3, "blank line"),
        ("img0,C0040405,C0817096\nimg1\nimg2\nimg3\n", 2, "3 fields"),
        ("img0,C0040405\nimg1\nimg2\nimg3\nimg9\n", 6, "not in the references"),
        ("img0,C0040405\nimg1\nimg1\nimg2\nimg3\n", 4, "more than once"),
        ("img0,C0040405;C0817096;C0040405\nimg1\nimg2\nimg3\n", 2, "same concept more than once"),
        ("img0,C0040405\nimg1\nimg2\n", None, "1 of 4 reference IDs are missing"),
        (" img0,C0040405\nimg1\nimg2\nimg3\n", 2, "surrounding spaces"),
        ("img0," + ";".join(f"C{i:07d}" for i in range(101)) + "\nimg1\nimg2\nimg3\n", 2, "at most 100"),
    ],
    ids=["blank", "fields", "unknown", "duplicate", "repeated", "missing", "space", "too-many"],
)
def test_the_checker_refuses_what_the_evaluator_refuses_with_the_row(
    tmp_path: Path, body: str, row: int | None, words: str
) -> None:
    refs = _write_rows(tmp_path / "test_concepts.csv", REFS)
    sub = tmp_path / "submission.csv"
    sub.write_text("ID,CUIs\n" + body, encoding="utf-8")
    check = inspect_concept_submission(sub, refs)
    assert not check.ok
    hit = [e for e in check.errors if words in e]
    assert hit, check.errors
    if row is not None:
        assert hit[0].startswith(f"row {row}:"), hit
    with pytest.raises(EvaluationError, match="refuses"):
        evaluate_concepts(sub, refs, tmp_path / "eval", bootstrap=0)


def test_the_checker_accepts_what_the_evaluator_accepts_and_warns_on_what_it_scores_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = _write_rows(tmp_path / "test_concepts.csv", REFS)
    sub = tmp_path / "submission.csv"
    # No header, lower case, spaces around CUIs, a malformed CUI, an ID alone, quoted field.
    sub.write_text('img0,c0040405 ; C0817096\nimg1,C04\nimg2\nimg3,"C0040405"\n', encoding="utf-8")
    check = inspect_concept_submission(sub, refs)
    assert check.ok, check.errors
    assert check.predictions["img0"] == ("c0040405", "C0817096") and check.predictions["img2"] == ()
    assert any("row 2" in w and "'C04' is not a CUI" in w for w in check.warnings)
    assert cmd_check_submission([str(sub), "--task", "concepts", "--references", str(refs)]) == 0
    assert cmd_check_submission([str(sub), "--task", "concepts", "--references", str(refs), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "row 2:" in out
    # A zip holding submission.csv is read too; a BOM before the first ID is refused.
    z = tmp_path / "sub.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(sub, arcname="submission.csv")
    assert inspect_concept_submission(z, refs).ok
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + sub.read_bytes())
    assert any(
        e.startswith("row 1:") and "byte-order mark" in e
        for e in inspect_concept_submission(bom, refs).errors
    )
    # ... but a BOM before a header is what the evaluator skips with the header.
    bom.write_bytes(b"\xef\xbb\xbfID,CUIs\n" + sub.read_bytes())
    assert inspect_concept_submission(bom, refs).ok


def test_writer_round_trip_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = _write_rows(tmp_path / "valid_concepts.csv", REFS)
    _write_rows(tmp_path / "valid_concepts_manual.csv", [[i, "C0040405"] for i, _ in REFS])
    ids = [i for i, _ in REFS]
    sub = write_concept_submission(
        tmp_path / "run" / "predictions" / "valid.csv",
        ids[::-1],
        [["c0040405", " C0817096", "C0040405"], [], ["C0817096"], ["C0000726"]],
        reference_ids=ids,
    )
    lines = sub.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ID,CUIs" and lines[1] == "img0,C0000726" and lines[3] == "img2"
    assert lines[4] == "img3,C0040405;C0817096"
    with pytest.raises(ValueError, match="ID"):
        write_concept_submission(tmp_path / "x.csv", ["ID_1"], [[]])
    assert cmd_evaluate(["--task", "concepts", "--predictions", str(sub), "--references", str(refs)]) == 0
    out = capsys.readouterr().out
    assert "f1_manual" in out
    metrics = json.loads((tmp_path / "run" / "eval" / "valid" / "metrics.json").read_text())
    # Truth {C0040405, C0817096} everywhere: img0 {C0000726} 0, img1 {C0817096} 2/3, img2 {} 0, img3 1.
    assert metrics["metrics"]["f1"]["mean"] == pytest.approx(np.mean([0.0, 2 / 3, 0.0, 1.0]))
    # Manual truth {C0040405}: img0 0 (C0000726 is a manual CUI), img1 0, img2 0, img3 2/3.
    assert metrics["metrics"]["f1_manual"]["mean"] == pytest.approx(np.mean([0.0, 0.0, 0.0, 2 / 3]))
    per_concept = list(csv.DictReader((tmp_path / "run" / "eval" / "valid" / "per_concept.csv").open()))
    assert {r["cui"]: int(r["fn"]) for r in per_concept}["C0040405"] == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,CUIs\nimg0,C1,C2\n", encoding="utf-8")
    assert cmd_evaluate(["--task", "concepts", "--predictions", str(bad), "--references", str(refs)]) == 2
    assert "row 2" in capsys.readouterr().err


def test_references_from_a_prepared_manifest(tmp_path: Path) -> None:
    from medcap.data.manifest import MANIFEST_COLUMNS

    path = tmp_path / "manifest.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        w.writerow(["a", "/x/a.jpg", "c", "c", "C0040405;C0817096", "ct", 1, 1, "L", ""])
        w.writerow(["b", "/x/b.jpg", "c", "c", "", "unknown", 1, 1, "L", ""])
    refs = read_concept_references(path)
    assert refs == {"a": ("C0040405", "C0817096"), "b": ()}
    assert score_concepts({"a": ("C0040405",), "b": ()}, refs).left_out == ["b"]
