"""FSDP2 through ``accelerate launch`` with two CPU processes (gloo): the shipped fsdp2.yaml config
trains the same weights as one process with the same global batch, writes the trainable state and
optimizer sharded (torch.distributed.checkpoint, one shard per process), resumes exactly from them,
and selects the best checkpoint by a caption metric (captions generated in lockstep, as sharded
weights need).

PyTorch's FSDP2 (``fully_shard``) runs on gloo; accelerate 1.15 only turns FSDP on for GPU setups,
which ``medcap.train.sharding.enable_fsdp_on_cpu`` bridges (see its docstring). DeepSpeed's own
tests (one CPU process) are in tests/train/test_deepspeed.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcap.cli.train import cmd_train as cli
from medcap.config.recipes import accelerate_config
from tests.fixtures import (
    accelerate_launch,
    dropout_free_tiny,
    log_rows,
    make_prepared,
    one_thread,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


def _launch(args: list[str]) -> subprocess.CompletedProcess[str]:
    fsdp2 = ["--config_file", str(accelerate_config("fsdp2")), "--num_processes", "2"]
    return accelerate_launch(fsdp2, ["train", *args], timeout=400)


def test_fsdp_on_two_cpu_processes_matches_one_process_and_resumes_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepared = make_prepared(tmp_path / "prep", n_train=16, n_valid=6, seed=5)
    arch = dropout_free_tiny(tmp_path / "arch")
    common = {
        "model.name_or_path": arch,
        "model.random_init": "true",
        "model.peft.dropout": 0.0,
        # A constant rate, so that stopping at step 4 and resuming to step 8 follows the same
        # schedule as running 8 steps in one go (max_steps may change on resume; the schedule spans it).
        "schedule": "constant",
        "eval_every": 2,
        "eval_at_epoch_end": "false",
        "select_by": "rouge1",
        "select_subset": 4,
        "cpu": "true",
    }
    # Global batch 4: one process x 4, or two FSDP processes x 2.
    one = tmp_path / "one"
    assert cli(tiny_overrides(prepared, one, batch_size=4, max_steps=8, **common)) == 0
    two = tmp_path / "two"
    first = _launch(tiny_overrides(prepared, two, batch_size=2, max_steps=4, **common))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es) (fsdp)" in first.stdout
    last = two / "checkpoints" / "last"
    # Each process wrote its own shard; the model files were gathered on the main process.
    assert sorted(p.name for p in (last / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert state["strategy"] == "fsdp" and state["optimizer"] is None and len(state["rng"]) == 2

    # A sharded checkpoint cannot be resumed by one process (it would lose the optimizer state).
    capsys.readouterr()
    assert cli(["--resume", str(two), "--train.max_steps", "8"]) == 1
    assert "written under fsdp" in capsys.readouterr().err

    second = _launch(["--resume", str(two), "--train.max_steps", "8"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {last}" in second.stdout

    a, b = log_rows(one), log_rows(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        # log.csv keeps 6 significant digits: allow one unit of that rounding on top of 1e-5.
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=2e-5), (x, y)
        # The same captions of the same subset: the same ROUGE-1.
        assert (x["metric"], x["score"]) == (y["metric"], y["score"]), (x, y)
    assert any(r["metric"] == "rouge1" and r["score"] for r in a), "no metric was logged"
    for name in ("last", "best"):
        wa = load_file(str(one / "checkpoints" / name / "adapter" / "adapter_model.safetensors"))
        wb = load_file(str(two / "checkpoints" / name / "adapter" / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-5), f"{name}/{key}"
        ma, mb = (json.loads((run / "checkpoints" / name / "metrics.json").read_text()) for run in (one, two))
        assert (ma["step"], ma["best_step"], ma["best_score"]) == (
            mb["step"],
            mb["best_step"],
            mb["best_score"],
        )


@pytest.mark.slow
def test_fsdp_trains_from_the_query_cache_as_one_process_does(tmp_path: Path) -> None:
    """train.query_cache under FSDP: the cached forward goes through a method FSDP registered
    (``sharding.after_prepare``), so the shards are gathered for it; losses equal one process's."""
    from medcap.cli.train import cmd_features

    prepared = make_prepared(tmp_path / "prep", n_train=16, n_valid=6, seed=5)
    # Dropout off: the language model's dropout draws from each process's own RNG stream.
    arch = dropout_free_tiny(tmp_path / "arch")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        f"data:\n  prepared: {prepared}\n  num_workers: 0\nmodel:\n  name_or_path: {arch}\n"
        "  random_init: true\n  peft:\n    targets: lm-qv\n    dropout: 0.0\n",
        encoding="utf-8",
    )
    cache = tmp_path / "cache"
    assert cmd_features(["--config", str(cfg_path), "--out", str(cache), "--num-workers", "0"]) == 0
    common = {
        "model.name_or_path": arch,
        "model.random_init": "true",
        "model.peft.targets": "lm-qv",
        "model.peft.dropout": 0.0,
        "query_cache": cache,
        "max_steps": 4,
        "eval_every": 2,
        "cpu": "true",
    }
    one = tmp_path / "one"
    assert cli(tiny_overrides(prepared, one, batch_size=4, **common)) == 0
    two = tmp_path / "two"
    done = _launch(tiny_overrides(prepared, two, batch_size=2, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) (fsdp)" in done.stdout
    a, b = log_rows(one), log_rows(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=2e-5), (x, y)
