"""The training loop: logs, best/last checkpoints, early stopping, the non-finite guard, config
errors, gradient accumulation and the dry run, on the tiny model and tiny prepared data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medcap.train.loss as loss_module
from medcap.cli.train import cmd_train as cli
from medcap.config.loader import save_config
from medcap.config.run import load_run_config
from medcap.model.checkpoint import load_checkpoint
from medcap.train.batches import epoch_batches, eval_batches
from medcap.train.errors import NonFiniteLossError
from medcap.train.recipe import fit
from tests.fixtures import assert_no_model_left, dropout_free_tiny, make_prepared, one_thread, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prep"), n_train=16, n_valid=6)


def _log(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_logs_checkpoints_and_early_stopping(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # min_delta larger than any possible gain: only the first validation is a "best", so early
    # stopping must end the run after exactly `patience` more validations.
    cfg = load_run_config(
        None,
        tiny_overrides(
            prepared, run, epochs=20, eval_every=2, patience=2, min_delta=100.0, report_to="tensorboard,csv"
        ),
    )
    result = fit(cfg)
    assert result["stopped_early"] and result["step"] == 6 and result["best_step"] == 2
    assert result["total_steps"] == 20 * 4

    rows = _log(run)
    train_rows = [r for r in rows if r["split"] == "train"]
    valid_rows = [r for r in rows if r["split"] == "valid"]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in valid_rows] == [2, 4, 6]
    assert all(math.isfinite(float(r["loss"])) and float(r["lr"]) > 0 for r in train_rows)
    assert all(float(r["samples_per_s"]) > 0 for r in train_rows)
    assert set(rows[0]) >= {"step", "epoch", "split", "loss", "lr", "samples_per_s", "grad_norm"}

    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4, 6]
    assert all(s["reference"] and isinstance(s["prediction"], str) for s in samples)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_run_config(run / "config.yaml") == cfg

    best, last = run / "checkpoints" / "best", run / "checkpoints" / "last"
    assert json.loads((best / "metrics.json").read_text())["step"] == 2
    assert json.loads((last / "metrics.json").read_text())["step"] == 6
    for ckpt in (best, last):
        assert (ckpt / "config.yaml").is_file() and (ckpt / "data_hash.txt").is_file()
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert (last / "train_state.pt").is_file() and not (best / "train_state.pt").exists()
    a = load_file(str(best / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(last / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "best and last should hold different weights"

    # The best checkpoint is a model the captioning side can load.
    model, processor, run_cfg = load_checkpoint(best)
    assert str(run_cfg.train.out_dir) == str(run) and not model.training


def test_nonfinite_steps_are_skipped_then_stop_the_run(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = loss_module.token_loss_sum
    calls = {"n": 0}
    poisoned: set[int] = {2, 4}

    def loss_with_nan(logits: torch.Tensor, labels: torch.Tensor, decoder_only: bool) -> torch.Tensor:
        out = real(logits, labels, decoder_only)
        if torch.is_grad_enabled():  # training forwards only
            calls["n"] += 1
            if calls["n"] in poisoned or "all" in poisoned:
                return out * float("nan")  # NaN loss and NaN gradients, as a diverging fp16 step
        return out

    monkeypatch.setattr(loss_module, "token_loss_sum", loss_with_nan)
    run = tmp_path / "skip"
    result = fit(load_run_config(None, tiny_overrides(prepared, run, epochs=2, max_nonfinite_in_row=2)))
    assert result["nonfinite_skipped"] == 2 and result["step"] == 8
    rows = [r for r in _log(run) if r["split"] == "train"]
    assert [r["nonfinite_skipped"] for r in rows] == ["0", "1", "1", "2", "2", "2", "2", "2"]
    assert math.isnan(float(rows[1]["loss"])) and math.isfinite(float(rows[2]["loss"]))
    weights = load_file(str(run / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values()), "a NaN step reached the weights"
    assert "non-finite loss" in capsys.readouterr().out

    poisoned.add("all")  # type: ignore[arg-type]
    calls["n"] = 0
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 3"):
        fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "stop", max_nonfinite_in_row=3)))
    calls["n"] = 0
    assert cli(tiny_overrides(prepared, tmp_path / "stop-cli", max_nonfinite_in_row=2)) == 1
    err = capsys.readouterr().err
    assert "2 non-finite losses in a row" in err and "Lower train.lr" in err and "Traceback" not in err


def test_config_and_data_errors_are_clear(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert cli(["--config", "demo", "--train.lr", "fast"]) == 2
    err = capsys.readouterr().err
    assert "command line --train.lr fast: expected a number, got 'fast'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  eval_evry: 3\n")
    assert cli(["--config", str(bad)]) == 2
    assert "train.eval_evry: unknown setting (did you mean 'eval_every'?)" in capsys.readouterr().err
    assert cli(["--resume", str(tmp_path)]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    # Data that is not there: the message says what to run.
    assert cli(tiny_overrides(tmp_path / "no-data", tmp_path / "run")) == 1
    assert "run 'medcap data prepare ROOT --out DIR' first" in capsys.readouterr().err


def test_query_cache_trains_with_the_losses_of_the_normal_path(tmp_path: Path) -> None:
    """train.query_cache: batches of cached Q-Former outputs through medcap.train.query_cache, same losses as
    images through the vision tower (dropout off: the cache is computed in eval mode), within fp16."""
    from medcap.cli.train import cmd_features

    prepared = make_prepared(tmp_path / "prep", n_train=8, n_valid=4, seed=7)
    arch = dropout_free_tiny(tmp_path / "arch")
    common = {"model.name_or_path": arch, "model.random_init": "true", "model.peft.dropout": 0.0, "epochs": 1}
    normal = load_run_config(None, tiny_overrides(prepared, tmp_path / "normal", **common))
    fit(normal)
    save_config(normal, tmp_path / "config.yaml")
    assert cmd_features(["--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "cache")]) == 0
    cached = load_run_config(
        None, tiny_overrides(prepared, tmp_path / "cached", query_cache=tmp_path / "cache", **common)
    )
    fit(cached)
    a, b = _log(tmp_path / "normal"), _log(tmp_path / "cached")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b] and len(a) == 3
    for ra, rb in zip(a, b, strict=True):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=5e-3)


def test_loader_workers_serve_the_whole_run_and_end_with_it(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With data.num_workers > 0, fit() starts worker processes once per dataset (training and
    validation), not again for every epoch and every validation; they end with the run; and the
    losses are those of loading in the main process (the private loader generator leaves the
    global RNG, and so the dropout masks, alone)."""
    import multiprocessing

    import torch.utils.data as tud

    passes: list[int] = []

    class CountingLoader(tud.DataLoader):  # torch's own loader, counting the iterators it starts
        def _get_iterator(self):
            passes.append(self.num_workers)
            return super()._get_iterator()

    monkeypatch.setattr(tud, "DataLoader", CountingLoader)
    # 3 epochs of 4 steps, validations at steps 3, 4, 6, 8, 9, 12: inside and at the end of epochs.
    common = {"epochs": 3, "eval_every": 3}
    fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "main", **common)))
    assert len(passes) == 3 + 6  # in the main process every pass builds its iterator
    passes.clear()
    fit(
        load_run_config(
            None, tiny_overrides(prepared, tmp_path / "workers", **common, **{"data.num_workers": 1})
        )
    )
    assert passes == [1, 1], "one pool of workers for training, one for validation"
    assert multiprocessing.active_children() == []
    a, b = _log(tmp_path / "main"), _log(tmp_path / "workers")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """Two micro-batches of 4 accumulate to the gradient of one batch of 8: the step's loss is the
    token-weighted mean over all its micro-batches, not a mean of means. Dropout is off (a local
    copy of the tiny architecture) so that both runs see identical forwards."""
    prepared = make_prepared(tmp_path / "prep", n_train=16, n_valid=4, seed=3)
    arch = dropout_free_tiny(tmp_path / "arch")
    common = {
        "model.name_or_path": arch,
        "model.random_init": "true",
        "model.peft.dropout": 0.0,
        "bucket_by_length": "false",
        "epochs": 2,
    }
    big = fit(load_run_config(None, tiny_overrides(prepared, tmp_path / "big", batch_size=8, **common)))
    acc = fit(
        load_run_config(
            None, tiny_overrides(prepared, tmp_path / "acc", batch_size=4, grad_accum=2, **common)
        )
    )
    assert big["step"] == acc["step"] == 4
    a, b = _log(tmp_path / "big"), _log(tmp_path / "acc")
    for ra, rb in zip(a, b, strict=True):
        assert (ra["step"], ra["split"]) == (rb["step"], rb["split"])
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=2e-5)
    wa = load_file(str(tmp_path / "big" / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "acc" / "checkpoints" / "last" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_batch_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    a = epoch_batches(lengths, 4, seed=1, epoch=0, bucket=True)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0, bucket=True)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1, bucket=True)
    assert all(len(b) == 4 for b in a) and len(a) == 3
    assert set(range(11)) <= {i for b in a for i in b}  # every item; one filler from the start
    # Bucketing: each batch holds neighbours in length order.
    flat = epoch_batches(list(range(400)), 8, seed=0, epoch=0, bucket=True)
    assert all(max(b) - min(b) < 8 for b in flat)
    unbucketed = epoch_batches(list(range(400)), 8, seed=0, epoch=0, bucket=False)
    assert sum(max(b) - min(b) for b in unbucketed) > 20 * sum(max(b) - min(b) for b in flat)
    # Validation: every index exactly once over the processes.
    parts = [eval_batches(lengths, 2, r, 3) for r in range(3)]
    assert sorted(i for p in parts for b in p for i in b) == list(range(11))


def test_dry_run_on_phantoms_and_on_user_data(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = "demo"
    small = ["--train.dry_run_images", "6", "--train.dry_run_steps", "2", "--data.num_workers", "0"]
    # No data at the configured place: phantoms are generated into a temporary folder.
    assert cli(["--config", demo, "--dry-run", "--data.prepared", str(tmp_path / "absent"), *small]) == 0
    out = capsys.readouterr().out
    assert "6 phantom images" in out and "s/step" in out and "peak memory" in out
    assert "DRY RUN PASSED" in out
    # On a CPU a GPU-sized micro-batch shrinks to 2, and the run says so.
    assert "micro-batch(es) of 2 on" in out and "instead of train.batch_size 32" in out
    assert not (tmp_path / "absent").exists()
    # The user's data exists: its first rows are used, nothing is written next to it.
    before = sorted(p.name for p in prepared.rglob("*"))
    chosen = ["--train.dry_run_batch_size", "3"]
    assert cli(["--config", demo, "--dry-run", "--data.prepared", str(prepared), *small, *chosen]) == 0
    out = capsys.readouterr().out
    assert f"first 6 rows of {prepared}" in out and "DRY RUN PASSED" in out
    assert "micro-batch(es) of 3 on" in out
    assert sorted(p.name for p in prepared.rglob("*")) == before
    # A broken config fails in the dry run with the reason.
    assert (
        cli(
            [
                "--config",
                demo,
                "--dry-run",
                "--data.prepared",
                str(prepared),
                *small,
                "--model.full_finetune",
                "false",
                "--model.peft.method",
                "lora",
                "--model.peft.targets",
                "no_such_module,no_such_either",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "DRY RUN FAILED" in err and "no_such_module" in err


def test_dry_run_on_a_cpu_runs_smaller_and_says_how() -> None:
    import os

    from medcap.config.model import ModelConfig
    from medcap.config.train import TrainConfig
    from medcap.model.cpu import cpu_has_native_half_matmul
    from medcap.train.dry_run import dry_run_cpu_settings as _dry_run_cpu_settings

    gpu_model = ModelConfig(name_or_path="tiny", precision="fp16")
    gpu_train = TrainConfig(batch_size=8, grad_accum=4, mixed_precision="fp16")
    model, train, notes = _dry_run_cpu_settings(gpu_model, gpu_train)
    assert (train.batch_size, train.grad_accum, train.eval_batch_size) == (2, 2, 2)
    assert train.cpu_threads == max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1")))
    # fp16 becomes bf16 exactly where this CPU multiplies bf16 natively and fp16 only through fp32.
    switch = cpu_has_native_half_matmul("bf16") and not cpu_has_native_half_matmul("fp16")
    assert (model.precision, train.mixed_precision) == (("bf16", "bf16") if switch else ("fp16", "fp16"))
    assert len(notes) == 2 + switch and "train.batch_size 8" in notes[0] and "grad_accum 4" in notes[1]
    # bitsandbytes layers multiply in their compute dtype (no fp32 path): a slow half becomes bf16
    # where that is native, else fp32.
    qlora = ModelConfig(name_or_path="tiny", precision="fp16", quantization="4bit", compute_dtype="fp16")
    model, train, _ = _dry_run_cpu_settings(qlora, gpu_train)
    if cpu_has_native_half_matmul("fp16"):
        expected = ("fp16", "fp16", "fp16")
    elif cpu_has_native_half_matmul("bf16"):
        expected = ("bf16", "bf16", "bf16")
    else:
        expected = ("fp32", "fp32", "no")
    assert (model.precision, model.compute_dtype, train.mixed_precision) == expected
    # A config already CPU-sized, with its own thread count and batch choice, is left as it is.
    small = TrainConfig(batch_size=4, grad_accum=1, cpu_threads=1, dry_run_batch_size=4)
    model, train, notes = _dry_run_cpu_settings(ModelConfig(name_or_path="tiny"), small)
    assert notes == [] and (train.batch_size, train.cpu_threads, model.precision) == (4, 1, "fp32")


def test_a_finished_fit_leaves_no_model_behind(tmp_path: Path) -> None:
    """fit() in a fresh process imports peft and bitsandbytes first; a log handler that keeps their
    record (and so the frames of its exception) must not keep the trained model alive, or
    `medcap run` would predict beside it (see model.import_backends)."""
    assert_no_model_left(
        f"""
        from pathlib import Path
        from tests.fixtures import make_prepared, tiny_overrides
        from medcap.config.run import load_run_config
        from medcap.train.recipe import fit
        tmp = Path({str(tmp_path)!r})
        fit(load_run_config(None, tiny_overrides(make_prepared(tmp / "prep", 8, 4), tmp / "run", max_steps=1)))
        """
    )


def test_two_fits_in_one_process_with_different_mixed_precision(tmp_path):
    """accelerate keeps one process-wide state: a second fit() with another mixed precision (bf16
    after fp32) must not fail with 'AcceleratorState has already been initialized'."""
    prepared = make_prepared(tmp_path / "prepared", n_train=4, n_valid=2)
    for i, mp in enumerate(("no", "bf16", "no")):
        args = tiny_overrides(prepared, tmp_path / f"run{i}", epochs=1, batch_size=4)
        cfg = load_run_config(
            None, [*args, "--train.mixed_precision", mp, "--train.num_sample_captions", "0"]
        )
        assert fit(cfg)["step"] == 1
