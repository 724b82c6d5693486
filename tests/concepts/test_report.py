"""The report's concepts section: scores, F1 per frequency band, the most confused concepts and
example images, drawn from what ``medcap evaluate --task concepts`` wrote."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from medcap.config.concepts import ConceptRunConfig
from medcap.config.data import DataConfig
from medcap.config.loader import save_config
from medcap.data.manifest import read_manifest
from medcap.eval.concept_submission import write_concept_submission
from medcap.eval.concepts import evaluate_concepts
from medcap.eval.report import write_report
from medcap.eval.report_concepts import band_scores, confused_pairs


def test_bands_and_confusions_count_what_the_rows_say() -> None:
    per_concept = [
        {"cui": "C0000001", "support": "150", "tp": "120", "fp": "10", "fn": "30"},
        {"cui": "C0000002", "support": "30", "tp": "10", "fp": "0", "fn": "20"},
        {"cui": "C0000003", "support": "3", "tp": "0", "fp": "4", "fn": "3"},
        {"cui": "C0000004", "support": "0", "tp": "0", "fp": "7", "fn": "0"},
    ]
    bands = {b["band"]: b for b in band_scores(per_concept)}
    assert bands["100+"]["f1"] == 2 * 120 / (2 * 120 + 10 + 30)
    assert bands["20-99"]["recall"] == 10 / 30 and bands["5-19"]["concepts"] == 0
    assert bands["1-4"]["f1"] == 0.0 and bands["not in the split"]["false_positives"] == 7
    per_image = [
        {"true": "C0000001;C0000002", "predicted": "C0000001;C0000003"},
        {"true": "C0000002", "predicted": "c0000003"},
        {"true": "C0000002", "predicted": "C0000002"},
    ]
    assert confused_pairs(per_image) == [("C0000002", "C0000003", 2)]


def test_the_concepts_section_of_a_concept_run(phantom_prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "crun"
    run.mkdir()
    save_config(ConceptRunConfig(data=DataConfig(prepared=phantom_prepared)), run / "config.yaml")
    rows = read_manifest(phantom_prepared / "test" / "manifest.csv")
    rng = random.Random(0)
    all_cuis = sorted({c for r in rows for c in r.cuis})
    predicted = [[c for c in r.cuis if rng.random() < 0.7] + rng.sample(all_cuis, 2) for r in rows]
    sub = run / "predictions" / "test.csv"
    sub.parent.mkdir()
    write_concept_submission(sub, [r.id for r in rows], predicted, reference_ids=[r.id for r in rows])
    summary = evaluate_concepts(
        sub, phantom_prepared / "test" / "manifest.csv", run / "eval" / "test", bootstrap=50
    )
    page = write_report(run).read_text(encoding="utf-8")
    concepts = page[page.index("<h2>Concepts</h2>") :]
    assert f"{summary['metrics']['f1']['mean']:.4f}" in concepts
    for heading in (
        "F1 per concept frequency band",
        "Most confused concepts",
        "Examples: best",
        "Examples: worst",
    ):
        assert heading in concepts
    assert concepts.count("data:image/jpeg") >= 12  # example cards with their images
    assert "Magnetic Resonance Imaging" in concepts or "X-Ray Computed Tomography" in concepts  # named
    with (run / "eval" / "test" / "per_concept.csv").open(encoding="utf-8") as f:
        worst = max(csv.DictReader(f), key=lambda r: int(r["fp"]) + int(r["fn"]))
    assert worst["cui"] in concepts
