"""Choosing checkpoints by the benchmark's metric (train.select_by): on phantoms, the metric and the
loss pick different checkpoints from the same training, the chosen step is the best one logged, and
the logged figure is what ``medcap evaluate`` reports for the same captions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medcap.cli.eval import cmd_evaluate
from medcap.config.loader import ConfigError
from medcap.config.run import load_run_config
from medcap.eval.report import write_report
from medcap.train.errors import TrainingError
from medcap.train.recipe import fit
from tests.fixtures import make_phantom_prepared, make_prepared, minilm_or_skip, one_thread, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


def _valid_rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "valid"]


def _phantom_run(prepared: Path, out: Path, select_by: str) -> dict:
    # The demo's recipe (the tiny model trained whole from scratch), shortened: 40 steps, validating
    # every 8; all 18 validation images captioned, all of them written to samples.jsonl.
    overrides = tiny_overrides(
        prepared,
        out,
        batch_size=16,
        lr=2e-3,
        warmup_steps=5,
        weight_decay=0.0,
        max_steps=40,
        eval_every=8,
        eval_at_epoch_end="false",
        select_by=select_by,
        select_bertscore_model="minilm",
        select_subset=18,
        num_sample_captions=18,
        **{"model.full_finetune": "true", "model.peft.method": "none", "generate.max_new_tokens": 24},
    )
    return fit(load_run_config(None, overrides))


def test_metric_and_loss_choose_different_checkpoints_and_agree_with_evaluate(tmp_path: Path) -> None:
    minilm_or_skip()
    prepared = make_phantom_prepared(tmp_path / "data")
    by_loss = _phantom_run(prepared, tmp_path / "loss", "loss")
    by_metric = _phantom_run(prepared, tmp_path / "bertscore", "bertscore")

    loss_rows, metric_rows = _valid_rows(tmp_path / "loss"), _valid_rows(tmp_path / "bertscore")
    # The same training either way: selection only looks.
    assert [(r["step"], r["loss"]) for r in loss_rows] == [(r["step"], r["loss"]) for r in metric_rows]
    assert [int(r["step"]) for r in metric_rows] == [8, 16, 24, 32, 40]
    assert all(r["metric"] == "bertscore" and r["score"] for r in metric_rows)
    assert all(not r["metric"] and not r["score"] for r in loss_rows)

    # Each run's best checkpoint is at its own figure's best logged validation (first one on ties).
    losses = [(float(r["loss"]), int(r["step"])) for r in loss_rows]
    scores = [(float(r["score"]), int(r["step"])) for r in metric_rows]
    best_loss_step = min(losses)[1]
    best_score = max(s for s, _ in scores)
    best_score_step = next(step for s, step in scores if s == best_score)
    assert by_loss["best_step"] == best_loss_step
    assert by_metric["best_step"] == best_score_step
    assert by_metric["best_score"] == pytest.approx(best_score, rel=1e-5)
    assert by_metric["best_score"] >= max(s for s, _ in scores) - 1e-6
    # ... and here they differ: the loss keeps falling while BERTScore stops improving.
    assert by_loss["best_step"] != by_metric["best_step"], (losses, scores)
    for run, step in ((tmp_path / "loss", best_loss_step), (tmp_path / "bertscore", best_score_step)):
        assert json.loads((run / "checkpoints" / "best" / "metrics.json").read_text())["step"] == step

    # samples.jsonl holds the scored captions; medcap evaluate on those captions gives the logged figure.
    samples = [json.loads(x) for x in (tmp_path / "bertscore" / "samples.jsonl").read_text().splitlines()]
    chosen = [s for s in samples if s["step"] == best_score_step]
    assert len(chosen) == 18 and all(s["metric"] == "bertscore" for s in chosen)
    predictions = tmp_path / "chosen.csv"
    with predictions.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["ID", "Caption"], *[[s["id"], s["prediction"]] for s in chosen]])
    out = tmp_path / "eval"
    argv = [
        "--predictions",
        str(predictions),
        "--references",
        str(prepared / "valid" / "manifest.csv"),
        "--protocol",
        "imageclef2024",
        "--bertscore-model",
        "minilm",
        "--out",
        str(out),
        "--bootstrap",
        "0",
    ]
    assert cmd_evaluate(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"]["bertscore"]["mean"] == pytest.approx(by_metric["best_score"], abs=1e-6)
    with (out / "per_caption.csv").open(newline="", encoding="utf-8") as f:
        per_caption = {r["id"]: float(r["bertscore"]) for r in csv.DictReader(f)}
    for s in chosen:
        assert per_caption[s["id"]] == pytest.approx(s["score"], abs=1e-6)

    # The report shows the metric's curve and which checkpoint it chose.
    html = write_report(tmp_path / "bertscore").read_text(encoding="utf-8")
    assert "selection metric bertscore" in html
    assert (
        f"chosen by bertscore on the captioned validation subset: best {best_score:.4f} at step {best_score_step}"
        in html
    )


def test_a_selection_that_cannot_be_computed_is_refused_before_training(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4)
    with pytest.raises(
        ConfigError, match="train.select_by 'bertscor' is not a metric .* choose from loss, bertscore"
    ):
        fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "a", select_by="bertscor")))
    with pytest.raises(ConfigError, match="train.select_by bleurt: needs a BLEURT checkpoint"):
        fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "b", select_by="bleurt")))
    with pytest.raises(ConfigError, match="train.select_subset must be a positive number"):
        load_run_config(None, tiny_overrides(prepared, tmp_path / "c", select_subset=0))
    missing = tmp_path / "no-such-model"
    with pytest.raises(
        TrainingError, match="needs the BERTScore model .*no-such-model.*train.select_bertscore_model"
    ):
        fit(
            load_run_config(
                None,
                tiny_overrides(
                    prepared, tmp_path / "d", select_by="bertscore", select_bertscore_model=missing
                ),
            )
        )
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_resume_keeps_the_best_metric(tmp_path: Path) -> None:
    """A resumed run compares against the best figure saved in the checkpoint, not a fresh start."""
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4)
    common = {"eval_every": 2, "select_by": "rouge1", "select_subset": 4}
    first = fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "run", max_steps=4, **common)))
    again = fit(
        load_run_config(
            None, tiny_overrides(prepared, tmp_path / "run", max_steps=8, resume="true", **common)
        )
    )
    rows = _valid_rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    scores = [(float(r["score"]), int(r["step"])) for r in rows]
    best = max(s for s, _ in scores)
    assert again["best_step"] == next(step for s, step in scores if s == best)
    assert again["best_score"] >= first["best_score"]
