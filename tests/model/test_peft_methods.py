"""The advanced PEFT methods (issue 17) on both BLIP-2 families: each builds through peft, trains,
is printed with its trainable parameter count, and comes back from a checkpoint with identical
outputs; the inits that rewrite the base restore it from the checkpoint; combinations a method or a
quantization cannot take are refused when the config loads."""

from __future__ import annotations

import pytest
import torch

from medcap.config.loader import ConfigError, from_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.run import RunConfig
from medcap.model.adapters import count_parameters
from medcap.model.build import build_model
from medcap.model.checkpoint import load_checkpoint, save_trainable
from medcap.model.peft_methods import AdapterSetup, norm_modules
from medcap.model.peft_state import orthogonal_penalty
from tests.fixtures import caption_collator, skip_missing
from tests.model.test_model import _image, _train_step, _write_run_config

CAPTIONS = [
    "CT of the chest with a mass on the left",
    "MRI of the head, a cyst on the right",
    "x-ray of the knee showing a fracture",
    "ultrasound of the neck: a small cyst",
]

#: (name, PeftSettings keyword arguments): every method and init, small.
CASES = {
    "pissa": {"init": "pissa"},
    "pissa-fast": {"init": "pissa", "pissa_iters": 2},
    "olora": {"init": "olora"},
    "eva": {"init": "eva", "eva_rho": 2.0},
    "corda": {"init": "corda"},
    "dora-pissa": {"method": "dora", "init": "pissa"},
    "vera": {"method": "vera", "r": 32},
    "adalora": {"method": "adalora", "r": 6, "adalora_target_r": 2},
    "oft": {"method": "oft"},
    "boft": {"method": "boft"},
    "norms": {"train_norms": True},
    "ia3-norms": {"method": "ia3", "train_norms": True},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(name: str, **peft) -> ModelConfig:
    peft.setdefault("r", 4)
    peft.setdefault("targets", "lm-all")
    return ModelConfig(name_or_path=name, peft=PeftSettings(**peft))


def _calibration(cfg: ModelConfig, calls: list[int] | None = None):
    """AdapterSetup.calibration over CAPTIONS (what fit() builds from the training split)."""

    def make(processor, per_batch):
        if calls is not None:
            calls.append(per_batch or 0)
        collate = caption_collator(processor, cfg, 48)
        pairs = [(_image(i % 2), c) for i, c in enumerate(CAPTIONS * 2)]
        step = per_batch or 4
        return [collate(pairs[i : i + step]) for i in range(0, len(pairs), step)]

    return make


def _batch(processor, cfg):
    return caption_collator(processor, cfg, 48)([(_image(0), CAPTIONS[0]), (_image(1), CAPTIONS[1])])


@pytest.mark.parametrize("family_name", ["tiny", "tiny-t5"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_method_trains_prints_its_count_and_round_trips(case, family_name, tmp_path, capsys, monkeypatch):
    """Build, one training step, checkpoint, reload: the same logits bit for bit. The base weights
    are rebuilt from the seed (as for a full-size random model), not stored, so inits that rewrite
    the base must restore it from the checkpoint's initial adapter."""
    from medcap.model import checkpoint

    monkeypatch.setattr(checkpoint, "BASE_WEIGHTS_LIMIT", 0)
    cfg = _cfg(family_name, **CASES[case])
    setup = AdapterSetup(train_steps=20, calibration=_calibration(cfg), show_progress=False)
    model, processor = build_model(cfg, adapters=setup)
    printed = capsys.readouterr().out
    trainable, _ = count_parameters(model)
    assert f"{trainable / 1e6:,.3f}M trainable" in printed
    assert f"peft {cfg.peft.method}" in printed
    batch = _batch(processor, cfg)
    before = _train_step(model, batch)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    written = save_trainable(model, tmp_path / "ckpt")
    _write_run_config(tmp_path / "ckpt", cfg)
    assert "base.safetensors" not in written
    rewrites_base = cfg.peft.init in ("pissa", "olora", "corda")
    assert ("adapter_init" in written) == rewrites_base
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.equal(got, expected)
    if case == "norms":  # the trained norms are adapter weights, not extra trainable files
        assert "trainable.safetensors" not in written
        assert any(".modules_to_save." in n for n in before)


def test_base_rewriting_init_without_its_initial_adapter_differs(tmp_path, monkeypatch):
    """The restore is what makes the round trip exact: without adapter_init/ the reloaded model
    would put the trained adapter on the original base (a different model)."""
    import shutil

    from medcap.model import checkpoint

    monkeypatch.setattr(checkpoint, "BASE_WEIGHTS_LIMIT", 0)
    cfg = _cfg("tiny", init="pissa")
    model, processor = build_model(cfg, verbose=False)
    batch = _batch(processor, cfg)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    save_trainable(model, tmp_path)
    _write_run_config(tmp_path, cfg)
    shutil.rmtree(tmp_path / "adapter_init")
    loaded, _, _ = load_checkpoint(tmp_path)
    with torch.no_grad():
        assert not torch.allclose(loaded(**batch).logits, expected, atol=1e-3)
    # A model that computed its own init cannot take a checkpoint's initial adapter on top.
    save_trainable(model, tmp_path / "again")
    fresh, _ = build_model(cfg, verbose=False)
    with pytest.raises(ValueError, match="computed its own pissa init"):
        checkpoint.load_trainable(fresh, tmp_path / "again")


def test_pissa_starts_at_the_base_model_and_keeps_its_adapter_init():
    """PiSSA's residual base + its adapter is the original model (peft's init, checked end to end)."""
    plain_cfg = _cfg("tiny", method="none", targets="lm-qv")
    plain_cfg = ModelConfig(name_or_path="tiny", full_finetune=True, peft=PeftSettings(method="none"))
    plain, processor = build_model(plain_cfg, verbose=False)
    cfg = _cfg("tiny", init="pissa")
    model, _ = build_model(cfg, verbose=False)
    batch = _batch(processor, cfg)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-4)
    assert model.medcap_adapter_init and all("lora_" in k for k in model.medcap_adapter_init)


def test_adalora_penalty_is_pefts_own():
    """medcap adds AdaLoRA's orthogonality penalty itself (its PeftModel has no task type, so peft's
    AdaLoraModel.forward is skipped): the value must be the one that forward adds to the loss."""
    cfg = ModelConfig(
        name_or_path="tiny",
        peft=PeftSettings(method="adalora", r=6, adalora_target_r=2, targets="lm-attn", dropout=0.0),
    )
    model, processor = build_model(cfg, verbose=False, adapters=AdapterSetup(train_steps=10))
    _train_step(model, _batch(processor, cfg))  # away from the init, where P, Q are not orthogonal anyway
    model.eval()
    batch = _batch(processor, cfg)
    with torch.no_grad():
        plain = model(**batch).loss  # PeftModel.forward: the transformers model only
        with_penalty = model.base_model(**batch).loss  # peft's AdaLoraModel.forward
        ours = orthogonal_penalty(model)
    assert ours is not None and float(ours) > 0
    assert float(with_penalty - plain) == pytest.approx(float(ours), rel=1e-5)
    other, _ = build_model(_cfg("tiny"), verbose=False)
    assert orthogonal_penalty(other) is None


def test_adalora_schedule_follows_the_run_steps(capsys):
    cfg = ModelConfig(
        name_or_path="tiny",
        peft=PeftSettings(method="adalora", r=6, adalora_target_r=2, adalora_warmup=0.1, adalora_final=0.25),
    )
    model, _ = build_model(cfg, adapters=AdapterSetup(train_steps=200))
    config = model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal, config.deltaT) == (200, 20, 50, 10)
    assert "prunes from step 20 to 150 of 200, every 10" in capsys.readouterr().out


def test_train_norms_stay_inside_the_adapted_blocks():
    model, _ = build_model(ModelConfig(name_or_path="tiny", peft=PeftSettings(method="none")), verbose=False)
    lm = [n for n, _ in model.named_modules() if n.startswith("language_model.") and n.endswith(".q_proj")]
    norms = norm_modules(model, lm)
    assert norms and all(n.startswith("language_model.") for n in norms)
    assert any(n.endswith("final_layer_norm") and ".layers." not in n for n in norms)  # the stack's own
    qformer = [n for n, _ in model.named_modules() if n.startswith("qformer.") and n.endswith(".query")]
    assert norms != norm_modules(model, qformer)
    assert all(n.startswith("qformer.") for n in norm_modules(model, qformer))
    t5, _ = build_model(ModelConfig(name_or_path="tiny-t5", peft=PeftSettings(method="none")), verbose=False)
    t5_lm = [n for n, _ in t5.named_modules() if n.startswith("language_model.") and n.endswith(".q")]
    assert any("layer_norm" in n for n in norm_modules(t5, t5_lm))  # T5LayerNorm is an RMSNorm


def test_eva_statistics_are_cached_beside_the_run(tmp_path, capsys):
    cfg = _cfg("tiny", init="eva")
    calls: list[int] = []
    setup = AdapterSetup(
        calibration=_calibration(cfg, calls), cache_dir=tmp_path / "peft_init", cache_key={"data": "a"}
    )
    first, _ = build_model(cfg, verbose=False, adapters=setup)
    assert calls and (tmp_path / "peft_init" / "eva.pt").is_file()
    again, _ = build_model(cfg, verbose=False, adapters=setup)
    assert len(calls) == 1 and "reusing the statistics" in capsys.readouterr().out
    a = {n: p for n, p in first.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in again.named_parameters() if "lora_A" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Other data: computed again.
    build_model(cfg, verbose=False, adapters=AdapterSetup(**{**setup.__dict__, "cache_key": {"data": "b"}}))
    assert len(calls) == 2


def test_data_driven_init_needs_training_batches():
    with pytest.raises(ConfigError, match="takes statistics from training batches"):
        build_model(_cfg("tiny", init="corda"), verbose=False)
    # ... but not when the adapter's weights come from elsewhere.
    build_model(_cfg("tiny", init="corda"), verbose=False, adapters=AdapterSetup(compute_init=False))


@pytest.mark.parametrize(
    ("model", "train", "message"),
    [
        ({"quantization": "4bit", "peft": {"init": "pissa"}}, {}, "init loftq .*or default"),
        ({"quantization": "8bit", "peft": {"init": "corda"}}, {}, "full-precision weights"),
        ({"quantization": "4bit", "peft": {"init": "olora"}}, {}, "re-quantizes the residual"),
        ({"peft": {"init": "loftq", "alpha": 16}}, {}, "needs model.quantization 4bit"),
        (
            {"quantization": "8bit", "peft": {"init": "loftq", "alpha": 16}},
            {},
            "needs model.quantization 4bit",
        ),
        ({"quantization": "4bit", "peft": {"init": "loftq"}}, {}, "only at scaling 1 .*set peft.alpha to 16"),
        (
            {"quantization": "4bit", "peft": {"init": "loftq", "method": "dora", "alpha": 16}},
            {},
            "use method lora",
        ),
        ({"quantization": "4bit", "peft": {"init": "loftq", "alpha": 16}}, {"cpu": True}, "CUDA"),
        ({"peft": {"method": "vera", "init": "eva"}}, {}, "method vera has no LoRA matrices"),
        ({"peft": {"method": "oft"}}, {"loraplus_ratio": 16}, "loraplus_ratio.*method oft has none"),
        ({"peft": {"method": "adalora", "adalora_target_r": 32}}, {}, "between 1 and peft.r"),
        ({"peft": {"method": "adalora", "adalora_warmup": 0.5, "adalora_final": 0.5}}, {}, "no steps"),
        ({"peft": {"method": "none", "train_norms": True}}, {}, "choose a peft.method"),
        ({"peft": {"pissa_iters": 4}}, {}, "only for init pissa"),
        ({}, {"loraplus_ratio": 0.5}, "at least 1"),
    ],
)
def test_combinations_refused_when_the_config_loads(model, train, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"model": {"name_or_path": "tiny", **model}, "train": train})


def test_loftq_on_a_machine_without_cuda_says_so(monkeypatch):
    # The rule is about machines without CUDA: on a GPU runner, pretend there is none (torch's
    # device query, not medcap's code, is replaced).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch, "xpu", None) is not None:
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    cfg = ModelConfig(name_or_path="tiny", quantization="4bit", peft=PeftSettings(init="loftq", alpha=16))
    with pytest.raises(ConfigError, match="CUDA .*init default"):
        build_model(cfg, verbose=False)
    # A LoftQ checkpoint loads anywhere: its adapter is the trained weights, the base plain NF4.
    build_model(cfg, verbose=False, adapters=AdapterSetup(compute_init=False))


def test_rotation_blocks_that_do_not_fit_are_refused():
    # peft's OFT would quietly pick another block size, and BOFT drop its butterfly factors.
    with pytest.raises(
        ConfigError, match=r"block_size 48 does not divide .*\(64, 256\).*\(2, 4, 8, 16, 32, 64\)"
    ):
        build_model(_cfg("tiny", method="oft", block_size=48), verbose=False)
    from peft.tuners.boft.layer import get_fbd_cuda

    if get_fbd_cuda() is None:
        with pytest.raises(ConfigError, match="CUDA extension"):
            build_model(_cfg("tiny", method="boft", butterfly_factor=2), verbose=False)


@pytest.mark.parametrize("case", ["vera", "adalora", "oft", "boft", "norms", "ia3-norms"])
def test_planner_counts_each_methods_adapter_as_built(case):
    from medcap.model.families import resolve_family
    from medcap.plan.memory import trainable_parameters
    from medcap.plan.planner import meta_model

    cfg = _cfg("tiny", **CASES[case])
    built, _ = build_model(cfg, verbose=False)
    base, family = meta_model(cfg)
    planned = trainable_parameters(base, cfg, resolve_family(cfg))
    assert planned.adapter_params == count_parameters(built)[0]


@pytest.mark.parametrize("case", ["eva", "adalora", "vera", "oft", "boft", "norms"])
def test_methods_on_a_4bit_base_train_and_round_trip(case, tmp_path, monkeypatch):
    """QLoRA-style: each method that a 4-bit base can take (pissa, olora and corda are refused at
    config load, loftq needs CUDA) trains on bitsandbytes layers and reloads with the same outputs."""
    from tests.model.test_model import _bnb_cpu_reason

    reason = _bnb_cpu_reason()
    if reason:
        skip_missing(reason)
    from medcap.model import checkpoint

    monkeypatch.setattr(checkpoint, "BASE_WEIGHTS_LIMIT", 0)
    cfg = ModelConfig(
        name_or_path="tiny",
        quantization="4bit",
        peft=PeftSettings(**{"r": 4, "targets": "lm-all", **CASES[case]}),
    )
    model, processor = build_model(
        cfg, verbose=False, adapters=AdapterSetup(train_steps=20, calibration=_calibration(cfg))
    )
    assert (
        type(model.get_base_model().language_model.model.decoder.layers[0].fc1.base_layer).__name__
        == "Linear4bit"
    )
    batch = _batch(processor, cfg)
    before = _train_step(model, batch)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    save_trainable(model, tmp_path)
    _write_run_config(tmp_path, cfg)
    loaded, _, _ = load_checkpoint(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
