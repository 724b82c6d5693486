"""The advanced PEFT methods inside fit(): a run interrupted (Ctrl-C) and resumed ends with the same
weights as an uninterrupted one, AdaLoRA prunes to its budget on the run's own schedule, LoRA+
gives B its learning rate, and a pissa / corda run on a pretrained base (no base weights in the
checkpoint) restores its residual base when it resumes."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcap.config.run import load_run_config
from medcap.train.recipe import fit
from tests.fixtures import make_prepared, one_thread, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # imported for pytest to find

CASES = {
    "adalora": {
        "model.peft.method": "adalora",
        "model.peft.r": 6,
        "model.peft.adalora_target_r": 2,
        "model.peft.adalora_interval": 2,
    },
    "eva+loraplus": {"model.peft.init": "eva", "model.peft.init_batches": 6, "train.loraplus_ratio": 16},
    "pissa+norms on a pretrained base": {"model.peft.init": "pissa", "model.peft.train_norms": "true"},
    "corda on a pretrained base": {"model.peft.init": "corda", "model.peft.init_batches": 2},
    "vera": {"model.peft.method": "vera", "model.peft.r": 32},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prep"), n_train=24, n_valid=8)


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory) -> Path:
    """A local model folder (config.json + weights, as a hub download or a merged export is): its
    weights are not written into checkpoints, so a resumed run must rebuild the residual base."""
    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.model.build import build_model

    folder = tmp_path_factory.mktemp("base")
    model, processor = build_model(
        ModelConfig(name_or_path="tiny", init_seed=3, peft=PeftSettings(method="none")), verbose=False
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "last" / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _interrupt_at(run: Path, step: int, armed: threading.Event) -> threading.Thread:
    """Press Ctrl-C (SIGINT to this process) once ``run`` has a checkpoint at ``step`` or later."""
    main = threading.main_thread().ident

    def watch() -> None:
        deadline = time.monotonic() + 120
        while armed.is_set() and _step(run) < step and time.monotonic() < deadline:
            time.sleep(0.001)
        if armed.is_set():
            signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _adapter(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_interrupted_and_resumed_run_ends_with_the_same_weights(case, prepared, pretrained_base, tmp_path):
    settings = {"epochs": 2, "eval_every": 4, "save_every": 1, **CASES[case]}
    if "pretrained base" in case:
        settings["model.name_or_path"] = pretrained_base
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert fit(load_run_config(None, tiny_overrides(prepared, full, **settings))) is not None

    armed = threading.Event()
    armed.set()
    watcher = _interrupt_at(cut, 5, armed)
    with pytest.raises(KeyboardInterrupt):
        try:
            fit(load_run_config(None, tiny_overrides(prepared, cut, **settings)))
        finally:
            armed.clear()
            watcher.join()
    assert 5 <= _step(cut) < 12, _step(cut)
    fit(load_run_config(None, tiny_overrides(prepared, cut, **settings, resume="true")))

    for which in ("last", "best"):
        a, b = _adapter(full, which), _adapter(cut, which)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), f"{which}/{key} differs after resume"
    ckpt = full / "checkpoints" / "last"
    if "pretrained base" in case:  # the base is not in the checkpoint: the resume rebuilt the residual
        assert (ckpt / "adapter_init").is_dir() and not (ckpt / "base.safetensors").exists()
    if case == "adalora":
        # The final allocation keeps target_r ranks per matrix on average: the run's schedule ran out.
        weights = _adapter(full)
        e = [v for k, v in weights.items() if "lora_E" in k]
        assert sum(int((v != 0).sum()) for v in e) == 2 * len(e)
        assert sum(v.numel() for v in e) == 6 * len(e)
    if case == "eva+loraplus":
        groups = torch.load(ckpt / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
        lrs = sorted({g["initial_lr"] for g in groups if g["params"]})  # the peak rates the schedule scales
        assert len(lrs) == 2 and lrs[1] == pytest.approx(16 * lrs[0])
        assert (full / "peft_init" / "eva.pt").is_file() and (
            full / "peft_init" / "eva.pt.key.json"
        ).is_file()
