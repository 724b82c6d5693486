"""Multi-process training through accelerate: two CPU processes (gloo) give the losses and weights
of one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcap.cli.train import cmd_train as cli
from tests.fixtures import (
    CPU_DDP,
    accelerate_launch,
    dropout_free_tiny,
    log_rows,
    make_prepared,
    one_thread,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=16, n_valid=6, seed=5)
    # Dropout off, so that the only difference between the runs is how the batch is split.
    arch = dropout_free_tiny(tmp_path / "arch")
    common = {
        "model.name_or_path": arch,
        "model.random_init": "true",
        "model.peft.dropout": 0.0,
        "epochs": 2,
        "eval_every": 2,
        "cpu": "true",
    }
    # Global batch 4: one process x 4, or two processes x 2.
    assert cli(tiny_overrides(prepared, tmp_path / "one", batch_size=4, **common)) == 0
    done = accelerate_launch(
        [*CPU_DDP, "--num_processes", "2"],  # with train.cpu true: torch.distributed on the CPU (gloo)
        ["train", *tiny_overrides(prepared, tmp_path / "two", batch_size=2, **common)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout

    one, two = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert len([r for r in one if r["split"] == "train"]) == 8
    for a, b in zip(one, two, strict=True):
        # log.csv keeps 6 significant digits: allow one unit of that rounding on top of 1e-5.
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=2e-5), (a, b)
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    # The checkpoint holds the RNG state of both processes (a resume restores each one's stream).
    state = torch.load(tmp_path / "two" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
