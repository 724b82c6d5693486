"""medcap export of every PEFT method: merged, the plain transformers model gives the checkpoint's
outputs; unmerged, peft itself puts the adapter on the base and gives them too. pissa / olora /
corda rewrote the base during training: on a downloadable base the unmerged adapter is converted to
a plain LoRA of rank 2r against the original weights (peft's conversion); on a private base the
residual base ships in base/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medcap.config.loader import to_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.infer.export import export
from medcap.model.build import build_model
from medcap.model.checkpoint import load_checkpoint, save_trainable
from medcap.model.peft_methods import AdapterSetup
from tests.fixtures import caption_collator
from tests.infer.test_export import _images, _logits
from tests.model.test_model import _image, _train_step

CASES = {
    "pissa": {"init": "pissa"},
    "corda": {"init": "corda"},
    "eva": {"init": "eva", "eva_rho": 2.0},
    "adalora": {"method": "adalora", "r": 6, "adalora_target_r": 2},
    "vera": {"method": "vera", "r": 32},
    "oft": {"method": "oft"},
    "boft": {"method": "boft"},
    "norms": {"train_norms": True},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_base(tmp_path_factory) -> Path:
    """A model folder standing in for a hub model: downloadable, so exports point at it."""
    folder = tmp_path_factory.mktemp("base")
    model, processor = build_model(
        ModelConfig(name_or_path="tiny", init_seed=5, peft=PeftSettings(method="none")), verbose=False
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _checkpoint(tmp: Path, cfg: ModelConfig) -> Path:
    """A checkpoint after one training step (so merging changes the weights)."""

    def calibration(processor, per_batch):
        collate = caption_collator(processor, cfg, 48)
        pairs = [(_image(i % 2), f"CT of the chest number {i}") for i in range(8)]
        step = per_batch or 4
        return [collate(pairs[i : i + step]) for i in range(0, 8, step)]

    model, processor = build_model(
        cfg,
        verbose=False,
        adapters=AdapterSetup(train_steps=10, calibration=calibration, show_progress=False),
    )
    batch = caption_collator(processor, cfg, 48)([(_image(0), "CT of the chest"), (_image(1), "MRI")])
    for _ in range(3):
        _train_step(model, batch)
    ckpt = tmp / "run" / "checkpoints" / "best"
    save_trainable(model, ckpt)
    run_cfg = {"model": to_dict(cfg), "train": {"lr": 0.001}}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(run_cfg), encoding="utf-8")
    return ckpt


@pytest.mark.parametrize("base", ["tiny", "local"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_both_exports_give_the_checkpoints_outputs(case, base, local_base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    name = "tiny" if base == "tiny" else str(local_base)
    cfg = ModelConfig(name_or_path=name, peft=PeftSettings(**{"r": 4, "targets": "lm-all", **CASES[case]}))
    ckpt = _checkpoint(tmp_path, cfg)
    reference, processor, _ = load_checkpoint(ckpt)
    images = _images()
    want = _logits(reference, processor, images)
    with reference.disable_adapter():
        assert not torch.allclose(_logits(reference, processor, images), want, atol=1e-4)

    merged = export(ckpt, tmp_path / "merged", merge=True)
    plain = Blip2ForConditionalGeneration.from_pretrained(merged).eval()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    assert torch.allclose(_logits(plain, processor, images), want, atol=2e-5, rtol=0)

    capsys.readouterr()
    unmerged = export(ckpt, tmp_path / "adapter", merge=False)
    printed = capsys.readouterr().out
    config = json.loads((unmerged / "adapter_config.json").read_text(encoding="utf-8"))
    assert config.get("init_lora_weights", True) is True  # peft must not compute an init over trained weights
    if base == "tiny":
        # The export's own base, by absolute path: AutoPeftModel finds it from any working directory.
        assert Path(config["base_model_name_or_path"]) == (unmerged / "base").resolve()
        base_model = Blip2ForConditionalGeneration.from_pretrained(unmerged / "base")
    else:
        assert config["base_model_name_or_path"] == str(local_base)
        base_model = Blip2ForConditionalGeneration.from_pretrained(local_base)
    loaded = PeftModel.from_pretrained(base_model, unmerged).eval()
    assert torch.allclose(_logits(loaded, processor, images), want, atol=2e-5, rtol=0)
    if case in ("pissa", "corda"):
        if base == "local":  # converted: rank 2r against the original base
            assert config["r"] == 8 and "converted to a plain LoRA of rank 8" in printed
        else:
            assert config["r"] == 4 and "base/ holds that residual base" in printed
