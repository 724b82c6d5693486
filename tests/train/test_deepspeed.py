"""DeepSpeed ZeRO-2 and ZeRO-3 through ``accelerate launch`` with the shipped configs, on one GPU with
the optimizer state offloaded to the CPU: the same losses and weights as a plain one-GPU run, and an
exact resume from the engine's sharded checkpoint.

Needs a CUDA GPU and the ``deepspeed`` package (marked ``gpu``: off by default; run with
``-m gpu`` on a lent GPU machine). DeepSpeed is not installable on the CPU development machine
(not in its package mirror), so this has not run there.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medcap.cli.train import cmd_train as cli
from medcap.config.recipes import accelerate_config
from tests.fixtures import (
    SUBPROCESS_ENV,
    dropout_free_tiny,
    free_port,
    make_prepared,
    skip_missing,
    tiny_overrides,
)

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
pytestmark = pytest.mark.gpu


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_one_gpu_with_optimizer_offload_matches_a_plain_run_and_resumes(
    tmp_path: Path, stage: int
) -> None:
    if not torch.cuda.is_available():
        skip_missing("DeepSpeed needs a CUDA GPU (run with -m gpu on a GPU machine)")
    if importlib.util.find_spec("deepspeed") is None:
        skip_missing("the deepspeed package is not installed: pip install deepspeed")
    shipped = yaml.safe_load(accelerate_config(f"deepspeed-zero{stage}").read_text(encoding="utf-8"))
    shipped["num_processes"] = 1
    shipped["deepspeed_config"]["offload_optimizer_device"] = "cpu"
    config = tmp_path / f"zero{stage}.yaml"
    config.write_text(yaml.safe_dump(shipped), encoding="utf-8")

    prepared = make_prepared(tmp_path / "prep", n_train=16, n_valid=6, seed=5)
    arch = dropout_free_tiny(tmp_path / "arch")
    common = {
        "model.name_or_path": arch,
        "model.random_init": "true",
        "model.peft.dropout": 0.0,
        "schedule": "constant",  # stopping at 4 and resuming to 8 follows the 8-step schedule
        "eval_every": 2,
        "eval_at_epoch_end": "false",
        "batch_size": 4,
        "cpu_threads": None,
    }
    common = {k: v for k, v in common.items() if v is not None}
    plain = tmp_path / "plain"
    assert cli(tiny_overrides(prepared, plain, max_steps=8, **common)) == 0

    def launch(args: list[str]) -> subprocess.CompletedProcess[str]:
        command = [str(ACCELERATE), "launch", "--config_file", str(config)]
        command += ["--main_process_port", str(free_port()), "-m", "medcap", "train", *args]
        return subprocess.run(
            command, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900
        )

    ds = tmp_path / "ds"
    first = launch(tiny_overrides(prepared, ds, max_steps=4, **common))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "(deepspeed)" in first.stdout
    assert (ds / "checkpoints" / "last" / "sharded").is_dir()
    second = launch(["--resume", str(ds), "--train.max_steps", "8"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    a, b = _rows(plain), _rows(ds)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        # The offloaded AdamW steps on the CPU in fp32: the same arithmetic up to summation order.
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=1e-4), (x, y)
    for name in ("last", "best"):
        wa = load_file(str(plain / "checkpoints" / name / "adapter" / "adapter_model.safetensors"))
        wb = load_file(str(ds / "checkpoints" / name / "adapter" / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key].to(wa[key].dtype), atol=1e-4), f"{name}/{key}"
