"""Every PEFT method on every image-text-to-text family (issue 17, point 1): the methods whose
modules depend on the family (the LoRA inits that read weights or data, VeRA, AdaLoRA, OFT / BOFT,
(IA)3, trainable norms), each on the family's tiny model with a target that reaches its language
model (and, for some, its vision tower and projector): build with the family's own calibration
batches, one training step that moves the adapter, checkpoint, reload with the same logits. BLIP-2
(OPT, T5) runs the same cases in tests/model/test_peft_methods.py; LoftQ needs CUDA and LoRA+ is an
optimizer setting (tests/train/test_peft_training.py)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from medcap.config.loader import ConfigError, from_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.run import RunConfig
from medcap.model.adapters import count_parameters
from medcap.model.build import build_model
from medcap.model.checkpoint import load_checkpoint, save_trainable
from medcap.model.families import FAMILIES
from medcap.model.families.vlm.family import VlmFamily
from medcap.model.peft_methods import AdapterSetup
from tests.model.test_model import _train_step, _write_run_config
from tests.model.test_vlm_families import image

VLM = {f.name: f for f in FAMILIES if isinstance(f, VlmFamily)}

CAPTIONS = [
    "CT of the chest with a mass on the left",
    "MRI of the head, a cyst on the right",
    "x-ray of the knee showing a fracture",
    "ultrasound of the neck: a small cyst",
]

#: (name, PeftSettings keyword arguments). ``targets`` defaults to lm-all (every language-model linear).
CASES = {
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "eva": {"init": "eva"},
    "corda": {"init": "corda"},
    "dora-pissa": {"method": "dora", "init": "pissa"},
    "vera": {"method": "vera", "r": 32},
    "adalora": {"method": "adalora", "r": 6, "adalora_target_r": 2},
    "oft": {"method": "oft", "block_size": 8},
    "boft": {"method": "boft", "block_size": 8},
    "norms": {"train_norms": True},
    "ia3-norms": {"method": "ia3", "train_norms": True},
}

#: Cases that also adapt the vision tower (and projector where the family has a LoRA-reachable one),
#: so that the data-driven inits see image-side layers and the rotations their sizes.
VISION_CASES = {
    "eva-vision": {"init": "eva", "targets": "lm-qv+vision"},
    "pissa-vision": {"init": "pissa", "targets": "lm-qv+vision"},
    "oft-vision": {"method": "oft", "block_size": 8, "targets": "lm-qv+vision"},
    "ia3-vision": {"method": "ia3", "targets": "lm-all+vision"},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(family: VlmFamily, **peft) -> ModelConfig:
    peft = {"r": 4, "targets": "lm-all", "dropout": 0.0, **peft}
    return ModelConfig(name_or_path=family.tiny_names[0], peft=PeftSettings(**peft))


def family_name(cfg: ModelConfig) -> str:
    return next(name for name, f in VLM.items() if cfg.name_or_path in f.tiny_names)


def _pairs(n: int):
    return [(image(i % 2), CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]


def _calibration(cfg: ModelConfig):
    """AdapterSetup.calibration as fit() builds it: the family's collator over training pairs."""

    def make(processor, per_batch):
        collate = VLM[family_name(cfg)].collator(processor, cfg, 32)
        pairs, step = _pairs(8), per_batch or 4
        return [collate(pairs[i : i + step]) for i in range(0, len(pairs), step)]

    return make


def _check(cfg: ModelConfig, tmp_path, capsys, monkeypatch) -> None:
    from medcap.model import checkpoint

    monkeypatch.setattr(checkpoint, "BASE_WEIGHTS_LIMIT", 0)  # the base is rebuilt from its seed
    setup = AdapterSetup(train_steps=20, calibration=_calibration(cfg), show_progress=False)
    model, processor = build_model(cfg, adapters=setup)
    printed = capsys.readouterr().out
    trainable, _ = count_parameters(model)
    assert trainable > 0 and f"{trainable / 1e6:,.3f}M trainable" in printed
    assert f"peft {cfg.peft.method}" in printed
    batch = VLM[family_name(cfg)].collator(processor, cfg, 32)(_pairs(2))
    before = _train_step(model, batch)
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "one training step moved no adapter parameter"
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    written = save_trainable(model, tmp_path / "ckpt")
    _write_run_config(tmp_path / "ckpt", cfg)
    assert ("adapter_init" in written) == (cfg.peft.init in ("pissa", "olora", "corda"))
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family_name", sorted(VLM))
@pytest.mark.parametrize("case", sorted(CASES))
def test_method_on_family_trains_and_round_trips(case, family_name, tmp_path, capsys, monkeypatch):
    _check(_cfg(VLM[family_name], **CASES[case]), tmp_path, capsys, monkeypatch)


#: In the default run: the data-driven statistics and the rotation blocks on image-side layers; the
#: other two (weight-only init, (IA)3's feed-forward split) with -m slow.
VISION_DEFAULT = ("eva-vision", "oft-vision")


@pytest.mark.parametrize("family_name", sorted(VLM))
@pytest.mark.parametrize(
    "case",
    [c if c in VISION_DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in sorted(VISION_CASES)],
)
def test_method_on_vision_side_trains_and_round_trips(case, family_name, tmp_path, capsys, monkeypatch):
    _check(_cfg(VLM[family_name], **VISION_CASES[case]), tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"name_or_path": "tiny-qwen2.5-vl", "peft": {"targets": "lm-qv+qformer-attn"}},
            r"'qformer-attn' is not a preset of the qwen2.5-vl family .*its presets are lm-qv, lm-attn, lm-all, "
            r"vision, projector",
        ),
        (
            # Gemma 3's projector is a weight matrix and a norm, no nn.Linear: no LoRA preset reaches it.
            {"name_or_path": "tiny-gemma3", "peft": {"method": "oft", "targets": "lm-all+projector"}},
            r"'projector' is not a preset of the gemma3 family .*presets are lm-qv, lm-attn, lm-all, vision \(",
        ),
        (
            {"name_or_path": "tiny-llava-next", "peft": {"targets": "lm-qv"}, "train_qformer": True},
            r"train_qformer: the llava-next family has no qformer; unset it\. It can train model\.train_vision "
            r"\(vision\), model\.train_language_projection \(projection\)",
        ),
        (
            {"name_or_path": "tiny", "peft": {"targets": "lm-all+projector"}},
            r"'projector' is not a preset of the blip2-opt family .*qformer-qv, qformer-attn",
        ),
    ],
)
def test_what_a_family_lacks_is_refused_when_the_config_loads(model, message):
    """Refused by from_dict (the config load), before any model is built, with what the family has."""
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"model": model})


@pytest.mark.parametrize("family_name", sorted(VLM))
def test_every_preset_a_family_lists_builds(family_name):
    """The other side of the refusal: every preset the config accepts for a family reaches layers."""
    family = VLM[family_name]
    cfg = _cfg(family, targets="+".join(family.target_presets))
    model, _ = build_model(cfg, verbose=False)
    for preset, pattern in family.target_presets.items():
        assert any(re.fullmatch(pattern, n) for n in model.medcap_lora_modules), preset


@pytest.mark.parametrize("family_name", sorted(VLM))
@pytest.mark.parametrize("case", ["pissa", "oft", "ia3-norms"])
def test_exports_of_family_give_the_checkpoints_outputs(case, family_name, tmp_path):
    """Merged: the family's plain transformers class gives the checkpoint's logits (no adapter left);
    unmerged: peft puts the adapter on the exported base/ (the tiny base cannot be downloaded; for pissa
    it is the residual base) and gives them too."""
    import transformers
    from peft import PeftModel

    from medcap.config.loader import to_dict
    from medcap.infer.export import export

    family = VLM[family_name]
    cfg = _cfg(family, **CASES[case])
    model, processor = build_model(cfg, verbose=False, adapters=AdapterSetup(train_steps=10))
    batch = family.collator(processor, cfg, 32)(_pairs(2))
    for _ in range(2):
        _train_step(model, batch)
    ckpt = tmp_path / "run" / "checkpoints" / "best"
    save_trainable(model, ckpt)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg), "train": {"lr": 0.001}}))
    reference, _, _ = load_checkpoint(ckpt)
    inputs = batch  # with the labels: encoder-decoder models build their decoder inputs from them
    with torch.no_grad():
        want = reference(**inputs).logits
    model_class = getattr(transformers, family.export_classes[0])

    plain = model_class.from_pretrained(export(ckpt, tmp_path / "merged", merge=True)).eval()
    adapter_parts = (".lora_", ".oft_", ".ia3_", "modules_to_save", "base_layer")
    assert not any(part in n for n, _ in plain.named_parameters() for part in adapter_parts)
    unmerged = export(ckpt, tmp_path / "adapter", merge=False)
    adapted = PeftModel.from_pretrained(model_class.from_pretrained(unmerged / "base"), unmerged).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, want, atol=5e-5, rtol=0)
        assert torch.allclose(adapted(**inputs).logits, want, atol=5e-5, rtol=0)
