"""Resume: a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run.

Also: checkpoints are swapped in atomically (a crash mid-write leaves a usable checkpoint), and
resuming with another config or other data says exactly what differs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcap.cli.train import cmd_train as cli
from medcap.config.run import load_run_config
from medcap.train.errors import TrainingError
from medcap.train.recipe import fit
from medcap.train.state import recover_checkpoint_dir, write_checkpoint_dir
from tests.fixtures import SUBPROCESS_ENV, make_prepared, one_thread, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert out, f"no adapter weights in {ckpt}"
    return out


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "medcap", "train", *overrides]


def _last_step(run: Path) -> int:
    metrics = run / "checkpoints" / "last" / "metrics.json"
    try:
        import json

        return int(json.loads(metrics.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def test_sigkill_then_resume_gives_identical_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=24, n_valid=8)
    # 2 epochs of 6 steps, validation every 4 steps (a validation and a best checkpoint fall between
    # the kill and the end), a checkpoint after every step so that the kill can land anywhere,
    # including in the middle of writing one. Dropout in the Q-Former makes the RNG state matter.
    settings = {"epochs": 2, "eval_every": 4, "save_every": 1}

    # The killed run: a real process, SIGKILLed once a few checkpoints are behind it.
    killed = tmp_path / "killed"
    stderr_log = tmp_path / "killed-stderr.txt"
    proc = subprocess.Popen(
        _train_cmd(tiny_overrides(prepared, killed, **settings)),
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=stderr_log.open("w"),
    )

    def kill_when_due() -> None:
        deadline = time.monotonic() + 240
        while _last_step(killed) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)

    watcher = threading.Thread(target=kill_when_due, daemon=True)
    watcher.start()
    try:
        # The uninterrupted run, in this process meanwhile (one thread each, as in the subprocess).
        full = tmp_path / "full"
        assert cli(tiny_overrides(prepared, full, **settings)) == 0
        watcher.join(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before it was killed: {stderr_log.read_text()[-2000:]}"
    )
    step_at_kill = _last_step(killed)
    assert 5 <= step_at_kill < 12, step_at_kill

    # Starting again without asking is refused (it would overwrite the run) ...
    capsys.readouterr()
    assert cli(tiny_overrides(prepared, killed, **settings)) == 1
    assert "--train.resume true" in capsys.readouterr().err
    # ... and `medcap train --resume RUN` continues from the run's saved config.
    assert cli(["--resume", str(killed)]) == 0
    assert f"resumed from {killed / 'checkpoints' / 'last'}" in capsys.readouterr().out

    for name in ("last", "best"):
        a, b = _weights(full / "checkpoints" / name), _weights(killed / "checkpoints" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), f"{name}/{key} differs after resume"
    # Training did change the adapter (the comparison is not between two untouched inits).
    assert any(v.abs().max() > 0 for k, v in _weights(full / "checkpoints" / "last").items() if "lora_B" in k)

    # The logs of the resumed run hold each step once, with the uninterrupted run's losses.
    def rows(run: Path) -> list[list[str]]:
        return [r.split(",")[:4] for r in (run / "log.csv").read_text().splitlines()[1:]]

    got, want = rows(killed), rows(full)
    assert [r[:3] for r in got] == [r[:3] for r in want]
    assert all(abs(float(a[3]) - float(b[3])) < 1e-4 for a, b in zip(got, want, strict=True))


def test_resume_with_other_config_or_data_says_what_differs(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4)
    run = tmp_path / "run"
    assert cli(tiny_overrides(prepared, run, epochs=1)) == 0

    other = load_run_config(None, tiny_overrides(prepared, run, epochs=1, lr=1e-4, resume="true"))
    with pytest.raises(TrainingError) as e:
        fit(other)
    assert "config train.lr: 0.003 -> 0.0001" in str(e.value)

    manifest = prepared / "train" / "manifest.csv"
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:-1]) + "\n")
    same = load_run_config(None, tiny_overrides(prepared, run, epochs=1, resume="true"))
    with pytest.raises(TrainingError) as e:
        fit(same)
    assert f"train manifest {manifest} changed" in str(e.value) and "rows 8 -> 7" in str(e.value)


def test_checkpoint_swap_is_atomic(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"

    def writer(text: str):
        def write(d: Path) -> None:
            (d / "weights.txt").write_text(text)

        return write

    write_checkpoint_dir(root, "last", writer("one"))
    write_checkpoint_dir(root, "last", writer("two"))
    assert (root / "last" / "weights.txt").read_text() == "two"
    assert sorted(p.name for p in root.iterdir()) == ["last"]

    # Killed while filling the temporary folder: the half-written one is dropped, the old one stays.
    (root / ".last.tmp").mkdir()
    (root / ".last.tmp" / "weights.txt").write_text("tw")
    assert recover_checkpoint_dir(root, "last") == root / "last"
    assert (root / "last" / "weights.txt").read_text() == "two" and not (root / ".last.tmp").exists()

    # Killed between parking the old folder and renaming the new one in: the old one comes back.
    os.rename(root / "last", root / ".last.old")
    assert recover_checkpoint_dir(root, "last") == root / "last"
    assert (root / "last" / "weights.txt").read_text() == "two"

    # Killed after the swap, before the old folder was deleted: the new one is kept.
    (root / ".last.old").mkdir()
    assert recover_checkpoint_dir(root, "last") == root / "last" and not (root / ".last.old").exists()

    # A failure inside the writer leaves the previous checkpoint untouched.
    def broken(d: Path) -> None:
        (d / "weights.txt").write_text("three")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint_dir(root, "last", broken)
    assert recover_checkpoint_dir(root, "last") == root / "last"
    assert (root / "last" / "weights.txt").read_text() == "two"
