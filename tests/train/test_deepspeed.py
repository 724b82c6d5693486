"""DeepSpeed ZeRO-2 and ZeRO-3 through ``accelerate launch`` with the shipped configs and the optimizer
state offloaded to host memory: the same losses and weights as a plain one-process run with the same
global batch, the trainable state gathered for ``adapter/`` (ZeRO-3: from the engine's 16-bit
consolidation), and an exact resume from the engine's own checkpoint, one process each.

DeepSpeed runs here through its CPU accelerator (it picks it when there is no GPU), so this runs in
the default suite; on a GPU machine the same test runs on CUDA. Several processes need GPUs:
accelerate 1.15 gives a DeepSpeed launch on CPU processes no backend, so each process would see a
world of one; fit() refuses that launch with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medcap.cli.train import cmd_train as cli
from medcap.config.recipes import accelerate_config
from tests.fixtures import (
    SUBPROCESS_ENV,
    accelerate_launch,
    dropout_free_tiny,
    log_rows,
    make_prepared,
    one_thread,
    skip_missing,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


# ZeRO-3 in the default run (it partitions and gathers everything ZeRO-2 does and the weights too);
# ZeRO-2 with -m slow, as its query-cache test below.
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_deepspeed_with_optimizer_offload_matches_a_plain_run_and_resumes(tmp_path: Path, stage: int) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        skip_missing("the deepspeed package is not installed: pip install deepspeed (extra 'test')")
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
        # Checkpoints chosen by a caption metric: under ZeRO-3 the captions need gathered weights.
        "select_by": "rouge1",
        "select_subset": 4,
        "eval_at_epoch_end": "false",
    }
    plain = tmp_path / "plain"
    assert cli(tiny_overrides(prepared, plain, max_steps=8, batch_size=4, **common)) == 0

    def launch(args: list[str]) -> subprocess.CompletedProcess[str]:
        return accelerate_launch(["--config_file", str(config)], ["train", *args], timeout=900)

    ds = tmp_path / "ds"
    first = launch(tiny_overrides(prepared, ds, max_steps=4, batch_size=4, **common))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 process(es) (deepspeed)" in first.stdout
    assert "; 16,384 trainable parameters;" in first.stdout  # counted whole, not as ZeRO-3's partitions
    # The engine's own checkpoint (its optimizer shard), beside the gathered adapter.
    assert list((ds / "checkpoints" / "last" / "sharded").rglob("*optim_states.pt"))
    second = launch(["--resume", str(ds), "--train.max_steps", "8"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    a, b = log_rows(plain), log_rows(ds)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        # The offloaded AdamW steps on the CPU in fp32: the same arithmetic up to summation order.
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=1e-4), (x, y)
    scores = [(r["step"], r["metric"], r["score"]) for r in b if r["split"] == "valid"]
    assert scores == [(r["step"], r["metric"], r["score"]) for r in a if r["split"] == "valid"]
    assert all(metric == "rouge1" and score for _, metric, score in scores)
    for name in ("last", "best"):
        wa = load_file(str(plain / "checkpoints" / name / "adapter" / "adapter_model.safetensors"))
        wb = load_file(str(ds / "checkpoints" / name / "adapter" / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key].to(wa[key].dtype), atol=1e-4), f"{name}/{key}"


def test_deepspeed_on_several_cpu_processes_is_refused_with_the_reason(tmp_path: Path) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        skip_missing("the deepspeed package is not installed: pip install deepspeed (extra 'test')")
    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4, seed=5)
    cpu_only = {**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}  # the same launch on a GPU machine's CPUs
    done = accelerate_launch(
        ["--config_file", str(accelerate_config("deepspeed-zero2")), "--num_processes", "2"],
        ["train", *tiny_overrides(prepared, tmp_path / "run", max_steps=2)],
        env=cpu_only,
    )
    assert done.returncode != 0
    assert "DeepSpeed was launched with 2 processes but accelerate sees 1" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_from_the_query_cache_as_a_plain_run_does(tmp_path: Path, stage: int) -> None:
    """train.query_cache under ZeRO-2 and ZeRO-3: losses equal a plain run's. The cached forward
    never runs the top model's forward, so under ZeRO-3 the validation captions need its own
    parameters gathered for generate (``sharding.own_parameters_gathered``)."""
    if importlib.util.find_spec("deepspeed") is None:
        skip_missing("the deepspeed package is not installed: pip install deepspeed (extra 'test')")
    from medcap.cli.train import cmd_features

    shipped = yaml.safe_load(accelerate_config(f"deepspeed-zero{stage}").read_text(encoding="utf-8"))
    shipped["num_processes"] = 1
    config = tmp_path / f"zero{stage}.yaml"
    config.write_text(yaml.safe_dump(shipped), encoding="utf-8")
    prepared = make_prepared(tmp_path / "prep", n_train=16, n_valid=6, seed=5)
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
        "batch_size": 4,
    }
    plain = tmp_path / "plain"
    assert cli(tiny_overrides(prepared, plain, **common)) == 0
    ds = tmp_path / "ds"
    done = accelerate_launch(
        ["--config_file", str(config)], ["train", *tiny_overrides(prepared, ds, **common)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process(es) (deepspeed)" in done.stdout
    a, b = log_rows(plain), log_rows(ds)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=1e-4), (x, y)
    samples = [json.loads(line) for line in (ds / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prediction"] for s in samples)


def test_train_cpu_under_a_deepspeed_launch_is_refused_not_run_without_deepspeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medcap.config.run import load_run_config
    from medcap.train.errors import TrainingError
    from medcap.train.recipe import fit

    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4, seed=5)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for its processes
    with pytest.raises(TrainingError, match=r"train.cpu is true, which turns off the DeepSpeed"):
        fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "run", cpu="true")))
