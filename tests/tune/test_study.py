"""medcap tune on one machine (the default SQLite storage): trials are normal run folders, pruning
stops weak trials from their validation figures, a study resumes after an interrupt without losing
the interrupted trial's training, and the report shows the search."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from medcap.layout import StudyLayout
from medcap.tune.space import load_space
from medcap.tune.study import open_study, tune
from tests.fixtures import SUBPROCESS_ENV, make_prepared, one_thread
from tests.tune.spaces import write_space

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


def _valid_losses(run: Path) -> dict[int, float]:
    with (run / "log.csv").open(newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "valid"}


def test_trials_are_run_folders_pruning_stops_weak_ones_and_the_report_shows_the_search(
    tmp_path: Path,
) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4)
    space = load_space(
        write_space(
            tmp_path / "space",
            prepared,
            trials=6,
            pruner={"kind": "median", "startup_trials": 1, "warmup_steps": 0},
        )
    )
    result = tune(space, tmp_path / "study", heartbeat=5, progress=False)
    assert result.counted == 6 and result.complete + result.pruned == 6 and result.failed == 0
    assert result.pruned >= 1, "the median pruner stopped no trial"

    layout = StudyLayout(tmp_path / "study")
    study = open_study(space, layout, heartbeat=5)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert run == layout.trial(t.number).root
        cfg = json.loads((run / "result.json").read_text())
        assert cfg["select_by"] == "loss"
        # The figures the pruner saw are the run's own validation losses.
        logged = _valid_losses(run)
        assert {s: pytest.approx(v, rel=1e-5) for s, v in t.intermediate_values.items()} == logged
        if t.state == optuna.trial.TrialState.PRUNED:
            assert cfg["stopped_by_caller"] and cfg["step"] < 8
        else:
            assert cfg["step"] == 8 and t.value == pytest.approx(min(logged.values()), rel=1e-5)
    best = min((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    assert result.best_trial == best.number
    assert layout.best_config.read_text() == (layout.trial(best.number).config).read_text()

    with layout.trials_table.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["number"]) for r in table] == list(range(6))
    assert {r["state"] for r in table} == {"COMPLETE", "PRUNED"}
    html = layout.report.read_text(encoding="utf-8")
    for part in (
        "Best settings",
        f"trial <b>{best.number}</b>",
        'alt="objective by trial"',
        'alt="parameter importances"',
        'alt="validation curves"',
        "pruned at step",
    ):
        assert part in html, part


def test_an_interrupted_study_resumes_and_the_interrupted_trial_continues_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4)
    path = write_space(tmp_path / "space", prepared, trials=2, max_steps=24)
    study_dir = tmp_path / "study"
    layout = StudyLayout(study_dir)
    # A worker in its own process, interrupted (Ctrl-C) once its first trial has written a checkpoint.
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medcap",
            "tune",
            "--space",
            str(path),
            "--study",
            str(study_dir),
            "--heartbeat",
            "5",
        ],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not layout.trial(0).last.train_state.is_file():
        assert worker.poll() is None and time.monotonic() < deadline, (
            worker.stdout.read() if worker.stdout else ""
        )
        time.sleep(0.2)
    time.sleep(0.5)
    worker.send_signal(signal.SIGINT)
    out, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130, out[-3000:]
    assert "run the same command again to resume" in out
    saved_step = json.loads((layout.trial(0).last.metrics).read_text())["step"]
    assert 0 < saved_step < 24
    before = [
        ln for ln in layout.trial(0).log.read_text().splitlines()[1:] if int(ln.split(",")[0]) <= saved_step
    ]

    space = load_space(path)
    result = tune(space, study_dir, heartbeat=5, progress=False)
    assert result.counted == 2 and result.complete == 2
    trials = open_study(space, layout, heartbeat=5).get_trials()
    interrupted, retry = trials[0], next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert interrupted.state == optuna.trial.TrialState.FAIL and interrupted.user_attrs["interrupted"]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == interrupted.params
    assert retry.user_attrs["run_dir"] == str(layout.trial(0).root)
    # Nothing trained was lost: the run went on from its checkpoint, one row per validation step.
    steps = sorted(_valid_losses(layout.trial(0).root))
    assert steps == list(range(2, 25, 2))
    # ... and not from scratch: the rows up to the checkpoint are the ones written before the interrupt.
    after = layout.trial(0).log.read_text().splitlines()[1:]
    assert after[: len(before)] == before
    assert {s: v for s, v in retry.intermediate_values.items() if s <= saved_step} == {
        s: v for s, v in interrupted.intermediate_values.items() if s <= saved_step
    }
    assert len({t.user_attrs["run_dir"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE}) == 2
