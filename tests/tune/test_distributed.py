"""Two workers share one study through a real PostgreSQL server: every trial is counted once, and
when one worker is killed (-9) in the middle of a trial, the other takes the trial over after the
heartbeat grace period and continues it from its last checkpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from medcap.layout import StudyLayout
from medcap.tune.study import ATTR_ERROR, ATTR_RETRY_OF, ATTR_SURPLUS
from tests.fixtures import SUBPROCESS_ENV, make_prepared
from tests.tune.postgres import postgres_server
from tests.tune.spaces import write_space

REPO = Path(__file__).resolve().parents[2]
TRIALS = 4


def _worker(space: Path, study: Path, url: str, log: Path) -> subprocess.Popen:
    argv = ["-m", "medcap", "tune", "--space", str(space), "--study", str(study), "--storage", url]
    return subprocess.Popen(
        [sys.executable, *argv, "--heartbeat", "2", "--quiet"],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_taken_over(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4)
    space = write_space(tmp_path / "space", prepared, trials=TRIALS, max_steps=12)
    study_dir = tmp_path / "study"
    layout = StudyLayout(study_dir)
    with postgres_server() as url:
        a = _worker(space, study_dir, url, tmp_path / "a.log")
        b = _worker(space, study_dir, url, tmp_path / "b.log")
        try:
            # Kill worker a once a trial of its own has written a checkpoint.
            deadline = time.monotonic() + 300
            victim = None
            while victim is None:
                assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "worker a never had a trial with a checkpoint"
                time.sleep(0.2)
                try:
                    with _quiet():
                        trials = _study(url, study_dir).get_trials()
                except KeyError:  # the workers have not created the study yet
                    continue
                for t in trials:
                    mine = t.user_attrs.get("worker", "").endswith(f":{a.pid}")
                    run = t.user_attrs.get("run_dir")
                    if mine and t.state == optuna.trial.TrialState.RUNNING and run:
                        if (Path(run) / "checkpoints" / "last" / "train_state.pt").is_file():
                            victim = t
            os.kill(a.pid, signal.SIGKILL)
            a.wait(timeout=30)
            run0 = Path(victim.user_attrs["run_dir"])
            saved_step = json.loads((run0 / "checkpoints" / "last" / "metrics.json").read_text())["step"]
            before = [
                ln
                for ln in (run0 / "log.csv").read_text().splitlines()[1:]
                if int(ln.split(",")[0]) <= saved_step
            ]
            assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        with _quiet():
            trials = _study(url, study_dir).get_trials()

    assert a.returncode == -signal.SIGKILL
    states = optuna.trial.TrialState
    counted = [
        t
        for t in trials
        if t.state in (states.COMPLETE, states.PRUNED)
        or (t.state == states.FAIL and ATTR_ERROR in t.user_attrs)
    ]
    # Every trial counted once: exactly the budget, each in its own run folder, none twice.
    assert len(counted) == TRIALS, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.state == states.COMPLETE for t in counted)
    runs = [t.user_attrs["run_dir"] for t in counted]
    assert len(set(runs)) == TRIALS
    assert len({tuple(sorted(t.params.items())) for t in counted}) == TRIALS  # no two workers drew alike
    for run in runs:
        assert json.loads((Path(run) / "result.json").read_text())["step"] == 12
    others = [t for t in trials if t not in counted]
    killed = [t for t in others if t.number == victim.number]
    assert killed and killed[0].state == states.FAIL and ATTR_ERROR not in killed[0].user_attrs
    assert all(t.user_attrs.get(ATTR_SURPLUS) or t.number == victim.number for t in others)
    # Nothing lost: the retry has the killed trial's settings and went on in its folder from the
    # checkpoint (the rows written before the kill are still there, the steps are each logged once).
    retry = next(t for t in counted if t.user_attrs.get(ATTR_RETRY_OF) == victim.number)
    assert retry.params == victim.params and retry.user_attrs["run_dir"] == str(run0)
    assert retry.user_attrs["worker"].endswith(f":{b.pid}")
    after = (run0 / "log.csv").read_text().splitlines()[1:]
    assert after[: len(before)] == before
    with (run0 / "log.csv").open(newline="") as f:
        train_steps = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert train_steps == list(range(1, 13))
    assert "resumed from" in (tmp_path / "b.log").read_text()
    assert layout.report.is_file() and layout.trials_table.is_file()


def _study(url: str, study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=study_dir.resolve().name, storage=url)


class _quiet:
    def __enter__(self) -> None:
        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        optuna.logging.set_verbosity(self.level)
