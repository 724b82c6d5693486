"""The main job (`medcap run`) end to end on a small phantom set: every stage's output exists and
the stages agree with each other (counts reconcile, the submission passes the checker)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medcap.cli import main


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_main_job_end_to_end(tmp_path: Path, one_thread, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["run", "--out", str(out), "--n", "60", "--seed", "3"]
    argv += ["--train.max_steps", "3", "--train.batch_size", "8", "--data.num_workers", "0"]
    argv += ["--train.report_to", "csv", "--train.progress_bar", "false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "report:" in printed

    prepared = out / "prepared"
    stats = json.loads((prepared / "test" / "stats.json").read_text())
    with (prepared / "test" / "manifest.csv").open(newline="", encoding="utf-8") as f:
        test_ids = [r["id"] for r in csv.DictReader(f)]
    assert test_ids and len(test_ids) + sum(1 for _ in (prepared / "test" / "skipped.csv").open()) - 1 == (
        stats.get("rows_in") or stats["counts"]["rows_in"]
    )

    run = out / "run"
    submission = run / "predictions" / "test.csv"
    assert (
        main(["check-submission", str(submission), "--references", str(prepared / "test" / "manifest.csv")])
        == 0
    )
    with submission.open(newline="", encoding="utf-8") as f:
        assert [r["ID"] for r in csv.DictReader(f)] == test_ids

    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert "rouge1" in metrics["metrics"]
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "<img" in html and "rouge" in html.lower()

    # The same command again reuses the finished run instead of failing or training anew: the
    # phantoms are reused, training resumes at its last step and takes no step, and the weights and
    # the training log stay as they were.
    weights = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*.safetensors"))}
    log = (run / "log.csv").read_text(encoding="utf-8")
    assert (
        weights and "\n3,0.5,train," in log and "\n3,0.5,valid," in log
    )  # 3 steps of 6 batches: half an epoch
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "(reused: already there with these options)" in again
    assert "resumed from" in again and "at step 3 " in again
    assert (run / "log.csv").read_text(encoding="utf-8") == log
    assert {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*.safetensors"))} == weights
