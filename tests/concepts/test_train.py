"""``medcap concepts train`` and ``predict`` on phantoms: bad CUIs counted and never fatal, the query
cache and the vision tower giving the same features, resume equal to an uninterrupted run, the
submission checked and scored, thresholds scored as the evaluator scores, and any family's vision side."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medcap.cli.concepts import cmd_concepts_predict, cmd_concepts_train
from medcap.cli.train import cmd_features
from medcap.concepts import train as concept_train
from medcap.concepts.train import fit_concepts
from medcap.config.concepts import load_concepts_config
from medcap.data.manifest import read_manifest
from medcap.eval.concepts import evaluate_concepts, score_concepts
from medcap.model.checkpoint import load_tensors
from tests.concepts.conftest import concept_overrides


def _corrupt(prepared: Path, out: Path) -> dict[str, int]:
    """A copy of the prepared folder whose training CUIs hold malformed, duplicated and unknown
    entries (the manifests are rewritten with the csv module; the images are shared)."""
    inserted = {"malformed": 0, "duplicated": 0, "out_of_vocab": 0}
    for split in ("train", "valid"):
        (out / split).mkdir(parents=True)
        with (prepared / split / "manifest.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        col = header.index("cuis")
        if split == "train":
            for i, row in enumerate(body[:12]):
                cuis = row[col].split(";")
                if i % 3 == 0:
                    cuis += ["X123", "c12"]  # not C + 7 digits
                    inserted["malformed"] += 2
                elif i % 3 == 1:
                    cuis += [f" {cuis[0].lower()} "]  # the same CUI again, in another case
                    inserted["duplicated"] += 1
                else:
                    cuis += [f"C99999{i:02d}"]  # well-formed, each once: in no vocabulary
                    inserted["out_of_vocab"] += 1
                row[col] = ";".join(cuis)
        with (out / split / "manifest.csv").open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([header, *body])
    return inserted


def test_bad_training_cuis_are_counted_reported_and_reconcile(
    phantom_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    inserted = _corrupt(phantom_prepared, bad)
    cfg = load_concepts_config(None, concept_overrides(bad, tmp_path / "run", **{"train.max_steps": 2}))
    result = fit_concepts(cfg)
    audit = result["audit"]["train"]
    clean = read_manifest(phantom_prepared / "train" / "manifest.csv")
    assert audit["malformed"] == inserted["malformed"]
    assert audit["duplicated"] == inserted["duplicated"]
    # Unknown CUIs: the inserted one, plus the clean data's CUIs too rare for min_freq 3.
    assert audit["out_of_vocab"] >= inserted["out_of_vocab"]
    assert sum("C99999" in e for e in audit["examples"]["out_of_vocab"]) >= 1
    assert audit["cuis_in"] == sum(len(r.cuis) for r in clean) + sum(inserted.values())
    assert (
        audit["cuis_in"] == audit["kept"] + audit["malformed"] + audit["duplicated"] + audit["out_of_vocab"]
    )
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert f"{inserted['malformed']} malformed" in err and f"{inserted['duplicated']} duplicated" in err
    metrics = json.loads((tmp_path / "run" / "checkpoints" / "last" / "metrics.json").read_text())
    assert metrics["audit"]["train"]["malformed"] == inserted["malformed"]


def test_cache_equals_tower_resume_equals_uninterrupted_and_predict_is_scored(
    phantom_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    model_args = ["--data.prepared", str(phantom_prepared), "--model.name_or_path", "tiny"]
    assert cmd_features(["--config", "demo", *model_args, "--model.full_finetune", "false", "--out", str(cache),
                         "--split", "train", "valid", "test", "--num-workers", "0"]) == 0  # fmt: skip

    # The cache holds what the vision tower computes (fp16 storage).
    from medcap.concepts.features import CachedFeatures, VisionFeatures, build_vision

    cfg = load_concepts_config(None, concept_overrides(phantom_prepared, tmp_path / "x"))
    rows = read_manifest(phantom_prepared / "valid" / "manifest.csv")[:6]
    vision, processor = build_vision(cfg.model)
    tower = next(VisionFeatures(vision, processor, rows).batches([list(range(6))]))
    cached = next(CachedFeatures(cache, rows).batches([list(range(6))]))
    torch.testing.assert_close(cached, tower, atol=2e-3, rtol=2e-3)

    # Six steps in one go, and a run interrupted after its step-3 checkpoint, then resumed: the same head.
    common = {"train.query_cache": cache, "train.eval_every": 3, "train.max_steps": 6}
    fit_concepts(load_concepts_config(None, concept_overrides(phantom_prepared, tmp_path / "one", **common)))
    real_step = concept_train.train_step

    def interrupted(run, features, targets):  # the process dies at step 4, after the checkpoint of 3
        if run.progress.step == 3:
            raise KeyboardInterrupt
        return real_step(run, features, targets)

    monkeypatch.setattr(concept_train, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cmd_concepts_train(concept_overrides(phantom_prepared, tmp_path / "two", **common))
    monkeypatch.setattr(concept_train, "train_step", real_step)
    assert cmd_concepts_train(["--resume", str(tmp_path / "two")]) == 0
    one = load_tensors(tmp_path / "one" / "checkpoints" / "last" / "head.safetensors")
    two = load_tensors(tmp_path / "two" / "checkpoints" / "last" / "head.safetensors")
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=0, rtol=0)
    log = list(csv.DictReader((tmp_path / "two" / "log.csv").open(encoding="utf-8")))
    assert [r["step"] for r in log if r["split"] == "valid"] == ["3", "6"]
    # A run folder with a checkpoint is not overwritten by accident.
    assert cmd_concepts_train(concept_overrides(phantom_prepared, tmp_path / "two", **common)) == 1

    # Predict through the vision tower and from the cache: the same submission, valid, and scored.
    run = tmp_path / "one"
    assert cmd_concepts_predict(["--checkpoint", str(run), "--split", "test"]) == 0
    sub = run / "predictions" / "test.csv"
    assert cmd_concepts_predict(["--checkpoint", str(run), "--split", "test", "--query-cache", str(cache),
                                 "--out", str(tmp_path / "cached.csv")]) == 0  # fmt: skip
    assert sub.read_text() == (tmp_path / "cached.csv").read_text()
    test_rows = read_manifest(phantom_prepared / "test" / "manifest.csv")
    with sub.open(encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["ID", "CUIs"] and [r[0] for r in lines[1:]] == [r.id for r in test_rows]
    summary = evaluate_concepts(
        sub, phantom_prepared / "test" / "manifest.csv", tmp_path / "eval", bootstrap=0
    )
    truth = {r.id: r.cuis for r in test_rows}
    pred = {r[0]: r[1].split(";") if len(r) > 1 and r[1] else [] for r in lines[1:]}
    assert summary["metrics"]["f1"]["mean"] == pytest.approx(score_concepts(pred, truth).mean, abs=1e-12)
    # Phantom concepts are visible (modality, region, finding): even six steps beat chance clearly.
    assert summary["metrics"]["f1"]["mean"] > 0.3


def test_tuned_f1_is_the_evaluators_score(phantom_prepared: Path) -> None:
    """The F1 the thresholds are tuned for is the official per-image F1 (also counting true CUIs
    outside the vocabulary), computed here by the evaluator's own function on decided CUIs."""
    from medcap.concepts.thresholds import decide, tune_thresholds
    from medcap.concepts.vocab import build_vocab

    rows = read_manifest(phantom_prepared / "valid" / "manifest.csv")
    vocab, _ = build_vocab(read_manifest(phantom_prepared / "train" / "manifest.csv"), 10)
    truth, _ = vocab.targets(rows)
    counts = np.array([len(set(r.cuis)) for r in rows])
    rng = np.random.default_rng(0)
    probs = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.5, 0, 1)
    for mode in ("global", "per_label"):
        tuned = tune_thresholds(probs, truth, counts, mode, min_label_positives=3)
        pred = decide(probs, tuned.thresholds)
        predicted = {
            r.id: [vocab.cuis[j] for j in np.flatnonzero(p)] for r, p in zip(rows, pred, strict=True)
        }
        official = score_concepts(predicted, {r.id: r.cuis for r in rows}).mean
        assert tuned.f1 == pytest.approx(official, abs=1e-12)
    assert tune_thresholds(probs, truth, counts, "per_label", 3).f1 >= tuned.f1_global


@pytest.mark.parametrize("tiny", ["tiny-qwen2.5-vl", "tiny-paligemma", "tiny-instructblip"])
def test_concepts_train_on_any_familys_frozen_vision_side(
    phantom_prepared: Path, tmp_path: Path, tiny: str
) -> None:
    settings = {
        "model.name_or_path": tiny,
        "data.max_train_samples": 32,
        "data.max_eval_samples": 8,
        "train.max_steps": 2,
    }
    cfg = load_concepts_config(None, concept_overrides(phantom_prepared, tmp_path / "run", **settings))
    result = fit_concepts(cfg)
    assert result["step"] == 2 and result["features"] == "vision tower"
    from medcap.concepts.model import load_concept_predictor
    from medcap.data.images import read_image

    predictor = load_concept_predictor(tmp_path / "run", "cpu")
    rows = read_manifest(phantom_prepared / "test" / "manifest.csv")[:3]
    found = predictor.predict([read_image(r.image) for r in rows])
    assert len(found) == 3 and all(f.cuis and f.modality for f in found)
