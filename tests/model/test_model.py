"""Tests of the BLIP-2 factory, the caption collator, PEFT presets and checkpoints (tiny models)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from PIL import Image, ImageDraw

from medcap.config.loader import ConfigError
from medcap.config.model import ModelConfig, PeftSettings
from medcap.model.adapters import count_parameters
from medcap.model.build import build_model
from medcap.model.checkpoint import load_checkpoint, save_trainable
from medcap.model.families import BLIP2_OPT, resolve_family
from medcap.model.families.blip2.architecture import resize_vision_positions
from tests.fixtures import caption_collator, skip_missing


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared, oversubscribed CPU a 2-thread tiny step was measured 10-50x
    slower (every op waits for both threads to be scheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(kind: int, size: int = 80) -> Image.Image:
    """Two clearly different synthetic images (a bright disc left or right)."""
    img = Image.new("RGB", (size, size), (20, 20, 20))
    d = ImageDraw.Draw(img)
    x = size // 4 if kind == 0 else 3 * size // 4
    d.ellipse((x - 12, size // 2 - 12, x + 12, size // 2 + 12), fill=(230, 230, 230))
    return img


def tiny_cfg(**kw) -> ModelConfig:
    peft = kw.pop("peft", PeftSettings(method="none"))
    if peft.method == "none" and not any(k.startswith("train_") for k in kw):
        kw.setdefault("full_finetune", True)
    return ModelConfig(name_or_path=kw.pop("name_or_path", "tiny"), peft=peft, **kw)


def test_tiny_builds_fast():
    build_model(tiny_cfg(), verbose=False)  # warm the lazy imports
    start = time.perf_counter()
    model, processor = build_model(tiny_cfg(), verbose=False)
    assert time.perf_counter() - start < 1.0
    trainable, total = count_parameters(model)
    assert trainable == total > 100_000
    assert processor.num_query_tokens == model.config.num_query_tokens == 8


def test_collator_labels_masked_exactly():
    cfg = tiny_cfg(prompt="a radiograph of")
    model, processor = build_model(cfg, verbose=False)
    collate = caption_collator(processor, cfg, max_length=64)
    tok = processor.tokenizer
    n_query = processor.num_query_tokens
    image_id = model.config.image_token_index
    prompt_len = len(tok(cfg.prompt)["input_ids"])  # <s> + prompt tokens
    captions = ["CT of the chest showing a mass.", "X-ray"]
    batch = collate([(_image(0), captions[0]), (_image(1), captions[1])])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    for row, caption in enumerate(captions):
        cap_ids = tok(caption, add_special_tokens=False)["input_ids"]
        n = n_query + prompt_len + len(cap_ids) + 1
        # The processor put exactly num_query_tokens image tokens first.
        assert (ids[row] == image_id).sum() == n_query
        assert (ids[row, :n_query] == image_id).all()
        assert ids[row, n_query] == tok.bos_token_id
        # Labels: -100 over image tokens and prompt, then the caption and EOS, -100 over padding.
        assert (labels[row, : n_query + prompt_len] == -100).all()
        assert labels[row, n_query + prompt_len : n - 1].tolist() == cap_ids
        assert labels[row, n - 1] == tok.eos_token_id
        assert (labels[row, n:] == -100).all()
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tok.pad_token_id).all()
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_image_reaches_language_model():
    cfg = tiny_cfg()
    model, processor = build_model(cfg, verbose=False)
    collate = caption_collator(processor, cfg, max_length=32)
    a = collate([(_image(0), "a bright disc")])
    b = collate([(_image(1), "a bright disc")])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        la, lb = model(**a), model(**b)
    assert not torch.allclose(la.logits, lb.logits)
    assert la.loss.item() != lb.loss.item()


def test_tiny_learns_image_conditioned_captions_and_stops():
    """End to end: two images, two captions; a few dozen steps make greedy decoding tell them apart
    and stop at the EOS the collator appended (no runaway to max_new_tokens)."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model, processor = build_model(cfg, verbose=False)
    images = [Image.new("RGB", (64, 64), (20, 20, 20)), Image.new("RGB", (64, 64), (230, 230, 230))]
    captions = ["a dark image", "a bright image of the chest"]
    batch = caption_collator(processor, cfg, 32)(list(zip(images, captions, strict=True)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    got: list[str] = []
    for step in range(1, 121):
        model.train()
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            model.eval()
            inputs = BLIP2_OPT.generation_inputs(processor, images, cfg.prompt)
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            got = BLIP2_OPT.decode(processor, out, inputs["input_ids"].shape[1])
            if got == captions:
                break
    assert got == captions
    # It stopped: the longest output is the longer caption + EOS, not 20 new tokens.
    assert out.shape[1] - inputs["input_ids"].shape[1] < 20


def test_generation_inputs_and_decode():
    cfg = tiny_cfg(prompt="a photo of")
    model, processor = build_model(cfg, verbose=False)
    inputs = BLIP2_OPT.generation_inputs(processor, [_image(0), _image(1)], cfg.prompt)
    n_query = processor.num_query_tokens
    assert (inputs["input_ids"][:, :n_query] == model.config.image_token_index).all()
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt_len
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    texts = BLIP2_OPT.decode(processor, out, prompt_len)
    assert len(texts) == 2 and all("a photo of" not in t for t in texts)


def test_tiny_t5_builds_and_computes_loss():
    cfg = tiny_cfg(name_or_path="tiny-t5", prompt="describe:")
    model, processor = build_model(cfg, verbose=False)
    collate = caption_collator(processor, cfg, max_length=32)
    batch = collate([(_image(0), "CT of the head"), (_image(1), "MRI")])
    tok = processor.tokenizer
    # Encoder gets the image tokens and the prompt; labels are the captions ending in EOS.
    assert (batch["input_ids"][:, : processor.num_query_tokens] == model.config.image_token_index).all()
    mri = tok("MRI", add_special_tokens=False)["input_ids"]
    assert batch["labels"][1, : len(mri) + 1].tolist() == mri + [tok.eos_token_id]
    assert (batch["labels"][1, len(mri) + 1 :] == -100).all()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="unknown preset"):
        PeftSettings(targets="lm-everything")
    with pytest.raises(ConfigError, match="peft.method: none"):
        ModelConfig(name_or_path="tiny", full_finetune=True)
    with pytest.raises(ConfigError, match="choose one"):
        ModelConfig(name_or_path="tiny", train_qformer=True, peft=PeftSettings(targets="lm-qv+qformer-attn"))
    assert PeftSettings(targets="q_proj,v_proj").targets == ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------------------------
# PEFT presets: where the adapters land, and how many parameters train
# ------------------------------------------------------------------------------------------------


def _lora_count(model, names: list[str], r: int) -> int:
    """Expected LoRA parameters: r * (in + out) per adapted linear, from the base shapes."""
    total = 0
    for name in names:
        module = model.get_submodule("base_model.model." + name)
        base = getattr(module, "base_layer", module)
        total += r * (base.in_features + base.out_features)
    return total


@pytest.mark.parametrize(
    ("targets", "allowed", "suffixes"),
    [
        ("lm-qv", "language_model.", {"q_proj", "v_proj"}),
        ("lm-attn", "language_model.", {"q_proj", "k_proj", "v_proj", "out_proj"}),
        ("lm-all", "language_model.", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
        ("qformer-qv", "qformer.", {"query", "value"}),
        ("qformer-attn", "qformer.", {"query", "key", "value"}),
    ],
)
def test_lora_presets_land_only_where_intended(targets, allowed, suffixes):
    model, _ = build_model(tiny_cfg(peft=PeftSettings(targets=targets, r=4)), verbose=False)
    lora_modules = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    lora_modules = {n.removeprefix("base_model.model.") for n in lora_modules}
    assert lora_modules == set(model.medcap_lora_modules)
    assert lora_modules, "the preset matched nothing"
    assert all(n.startswith(allowed) for n in lora_modules), lora_modules
    assert {n.rsplit(".", 1)[-1] for n in lora_modules} == suffixes
    # The vision tower has fc1/fc2 too: lm-all must not touch it.
    assert not any(n.startswith("vision_model") for n in lora_modules)
    if targets.startswith("qformer"):
        # Self- and cross-attention both.
        assert any(".crossattention." in n for n in lora_modules)
    trainable, _ = count_parameters(model)
    assert trainable == _lora_count(model, sorted(lora_modules), 4)
    # Every layer of the targeted stack got its adapters: 2 layers in the tiny model, and the
    # tiny Q-Former cross-attends in both (self + cross attention each).
    per_layer = 2 if targets.startswith("qformer") else 1
    assert len(lora_modules) == 2 * per_layer * len(suffixes)


def test_lora_preset_combination_and_explicit_list():
    model, _ = build_model(tiny_cfg(peft=PeftSettings(targets="lm-all+qformer-attn")), verbose=False)
    prefixes = {n.split(".")[0] for n in model.medcap_lora_modules}
    assert prefixes == {"language_model", "qformer"}
    # An explicit list goes to PEFT as is: "fc1" then reaches the vision tower as well.
    model, _ = build_model(tiny_cfg(peft=PeftSettings(targets=["fc1"])), verbose=False)
    prefixes = {n.split(".")[0] for n in model.medcap_lora_modules}
    assert prefixes == {"language_model", "vision_model"}
    with pytest.raises(ConfigError, match="matches no linear layer"):
        build_model(tiny_cfg(peft=PeftSettings(targets=["no_such_proj"])), verbose=False)


def test_t5_presets_reach_t5_linears():
    model, _ = build_model(
        tiny_cfg(name_or_path="tiny-t5", peft=PeftSettings(targets="lm-all")), verbose=False
    )
    ends = {n.rsplit(".", 1)[-1] for n in model.medcap_lora_modules}
    assert ends == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert all(n.startswith("language_model.") for n in model.medcap_lora_modules)


def test_full_size_counts_on_meta_device():
    """BLIP2-OPT-6.7B from the shipped config, shapes only: FACTS 4's trainable counts."""
    cfg = ModelConfig(precision="bf16", peft=PeftSettings(targets="lm-all+qformer-qv", r=16))
    model, processor = build_model(cfg, meta=True, verbose=False)
    inner = model.get_base_model()
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert abs(base_total - 7.75e9) / 7.75e9 < 0.005, base_total
    assert inner.language_model.model.decoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert inner.query_tokens.dtype == torch.float32  # kept fp32 like transformers does
    per_module: dict[str, int] = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            leaf = n.split(".lora_")[0].rsplit(".", 1)[-1]
            scope = "qformer" if ".qformer." in n else "lm"
            key = f"{scope}.{leaf}"
            per_module[key] = per_module.get(key, 0) + p.numel()
    qv = per_module["lm.q_proj"] + per_module["lm.v_proj"]
    attn = qv + per_module["lm.k_proj"] + per_module["lm.out_proj"]
    all6 = attn + per_module["lm.fc1"] + per_module["lm.fc2"]
    qformer = per_module["qformer.query"] + per_module["qformer.value"]
    assert round(qv / 1e6, 2) == 8.39
    assert round(attn / 1e6, 1) == 16.8
    assert round(all6 / 1e6, 1) == 37.7  # FACTS: 37.8M (37,748,736)
    assert all6 == 37_748_736
    assert round(qformer / 1e6, 2) == 0.95
    assert processor.num_query_tokens == 32


@pytest.mark.parametrize("name", ["Salesforce/blip2-opt-2.7b", "Salesforce/blip2-flan-t5-xl"])
def test_other_shipped_configs_build_on_meta(name):
    model, _ = build_model(
        ModelConfig(name_or_path=name, peft=PeftSettings(method="none")), meta=True, verbose=False
    )
    total = sum(p.numel() for p in model.parameters())
    if "2.7b" in name:
        assert abs(total - 3.74e9) / 3.74e9 < 0.005, total
    else:
        # transformers 5.x always ties T5's lm_head to its embedding: 3.88B here (3.94B untied).
        assert 3.8e9 < total < 4.0e9, total


# ------------------------------------------------------------------------------------------------
# Other PEFT methods, trainable flags, precision, quantization
# ------------------------------------------------------------------------------------------------


def _train_step(model, batch) -> dict[str, torch.Tensor]:
    """One AdamW step; returns the trainable parameters before the step."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    return before


@pytest.mark.parametrize("method", ["dora", "rslora", "ia3"])
def test_other_peft_methods_train(method):
    cfg = tiny_cfg(peft=PeftSettings(method=method, targets="lm-all", r=4))
    model, processor = build_model(cfg, verbose=False)
    batch = caption_collator(processor, cfg, 32)([(_image(0), "CT of the chest"), (_image(1), "MRI")])
    before = _train_step(model, batch)
    assert before
    tag = "ia3_" if method == "ia3" else "lora_"
    assert all(tag in n for n in before)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in before)
    if method == "rslora":
        layer = model.get_submodule("base_model.model." + model.medcap_lora_modules[0])
        assert layer.scaling["default"] == pytest.approx(cfg.peft.alpha / 4**0.5)
    if method == "ia3":
        # fc1/fc2 are feed-forward modules for (IA)3: scaled on their input.
        ff = model.peft_config["default"].feedforward_modules
        assert ff and all(n.rsplit(".", 1)[-1] in ("fc1", "fc2") for n in ff)


def test_trainable_flags():
    model, _ = build_model(tiny_cfg(train_qformer=True, train_language_projection=True), verbose=False)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "query_tokens", "language_projection"}
    model, _ = build_model(tiny_cfg(train_vision=True), verbose=False)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vision_model"}
    model, _ = build_model(tiny_cfg(peft=PeftSettings(targets="lm-qv"), train_qformer=True), verbose=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(".qformer." in n and "lora_" not in n for n in names)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_cfg(peft=PeftSettings(targets="lm-all", r=4), gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model, processor = build_model(cfg, verbose=False)
        with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        batch = caption_collator(processor, cfg, 32)([(_image(0), "CT of the chest")])
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_half_precision_keeps_qformer_fp32():
    cfg = tiny_cfg(precision="bf16", peft=PeftSettings(targets="lm-qv", r=4))
    model, processor = build_model(cfg, verbose=False)
    inner = model.get_base_model()
    assert inner.language_model.model.decoder.layers[0].fc1.weight.dtype == torch.bfloat16
    assert inner.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert inner.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.float32
    assert inner.query_tokens.dtype == torch.float32
    batch = caption_collator(processor, cfg, 32)([(_image(0), "CT of the chest")])
    assert torch.isfinite(model(**batch).loss)


def _bnb_cpu_reason() -> str | None:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu")
        layer(torch.randn(2, 64))
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"bitsandbytes cannot run 4-bit layers on this CPU: {e}"
    return None


def test_random_quantized_build_frees_the_16_bit_model_before_loading(monkeypatch):
    """A random-init quantized model goes through save + from_pretrained; the 16-bit model it was
    saved from must be gone by then (both alive: the 6.7B QLoRA dry run peaked at 24 GB of RAM)."""
    import gc

    from transformers import Blip2ForConditionalGeneration

    reason = _bnb_cpu_reason()
    if reason:
        skip_missing(reason)
    original = Blip2ForConditionalGeneration.from_pretrained.__func__
    alive_at_load: list[int] = []

    def observed(cls, *args, **kwargs):  # the real loader, after counting the models alive
        alive_at_load.append(sum(isinstance(o, Blip2ForConditionalGeneration) for o in gc.get_objects()))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "from_pretrained", classmethod(observed))
    gc.collect()
    gc.disable()  # only what build_model itself frees counts
    try:
        model, _ = build_model(tiny_cfg(quantization="4bit", peft=PeftSettings(r=4)), verbose=False)
    finally:
        gc.enable()
    assert alive_at_load == [0]
    assert model.medcap_config.quantization == "4bit"


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_tiny_takes_a_lora_step(quantization):
    reason = _bnb_cpu_reason()
    if reason:
        skip_missing(reason)
    import bitsandbytes as bnb

    cfg = tiny_cfg(quantization=quantization, peft=PeftSettings(targets="lm-all", r=4))
    model, processor = build_model(cfg, verbose=False)
    qtype = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    inner = model.get_base_model()
    assert isinstance(inner.language_model.model.decoder.layers[0].fc1.base_layer, qtype)
    assert isinstance(inner.vision_model.encoder.layers[0].mlp.fc1, qtype)
    # Kept out of quantization: the fp32 Q-Former and the tied output head.
    assert type(inner.qformer.encoder.layer[0].attention.attention.query) is torch.nn.Linear
    assert type(inner.language_model.lm_head) is torch.nn.Linear
    batch = caption_collator(processor, cfg, 32)([(_image(0), "CT of the chest"), (_image(1), "MRI")])
    before = _train_step(model, batch)
    assert all("lora_" in n for n in before)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_a_4bit_layer_bitsandbytes_cannot_pack_for_cpu_inference_keeps_the_general_kernel():
    """bitsandbytes repacks 4-bit layers for CPU inference (AVX512-BF16) in blocks of 32 output rows
    and 64 input columns and fails on other sizes; Qwen2.5-VL's vision MLP is 3,420 wide. The build
    leaves such layers on the general kernel: an eval forward without gradients works and gives the
    same numbers as the training-mode forward, and a layer of packable sizes keeps the fast layout."""
    reason = _bnb_cpu_reason()
    if reason:
        skip_missing(reason)
    import bitsandbytes as bnb

    from medcap.model.quantize import cpu_safe_4bit_layers

    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        [
            bnb.nn.Linear4bit(128, 36, compute_dtype=torch.bfloat16, quant_type="nf4"),  # out: not /32
            bnb.nn.Linear4bit(96, 64, compute_dtype=torch.bfloat16, quant_type="nf4"),  # in: not /64
            bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4"),
        ]
    ).to("cpu")
    fast = model[2].support_avx512bf16_for_cpu
    assert cpu_safe_4bit_layers(model) == (2 if fast else 0)
    assert [layer.support_avx512bf16_for_cpu for layer in model] == [False, False, fast]
    model.train()
    inputs = [torch.randn(3, layer.in_features, dtype=torch.bfloat16) for layer in model]
    reference = [layer(x) for layer, x in zip(model, inputs, strict=True)]
    model.eval()
    with torch.no_grad():
        for layer, x, expected in zip(model, inputs, reference, strict=True):
            assert torch.allclose(layer(x), expected, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Checkpoints, local folders, image size
# ------------------------------------------------------------------------------------------------


def _write_run_config(directory, cfg: ModelConfig) -> None:
    import yaml

    from medcap.config.loader import to_dict

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg), "train": {"lr": 0.001}}))


@pytest.mark.parametrize(
    "kw",
    [
        {"peft": PeftSettings(targets="lm-all", r=4), "train_qformer": True},
        {"full_finetune": True},
        {"name_or_path": "tiny-t5", "peft": PeftSettings(method="dora", targets="lm-qv", r=4)},
    ],
    ids=["lora+qformer", "full", "t5-dora"],
)
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, monkeypatch, kw):
    from medcap.model import random_init

    cfg = tiny_cfg(**kw)
    model, processor = build_model(cfg, verbose=False)
    batch = caption_collator(processor, cfg, 32)([(_image(0), "CT of the chest"), (_image(1), "MRI")])
    _train_step(model, batch)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    written = save_trainable(model, tmp_path / "ckpt")
    _write_run_config(tmp_path / "ckpt", cfg)
    if cfg.peft.method != "none":
        assert "adapter" in written and (tmp_path / "ckpt" / "adapter" / "adapter_config.json").is_file()
    # Rebuilding the random base must not matter: the checkpoint carries it (base.safetensors).
    original = random_init.random_fill
    monkeypatch.setattr(random_init, "random_fill", lambda m, seed, std: original(m, seed + 1, std))
    loaded, _, run_cfg = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.equal(got, expected)
    assert run_cfg.train.lr == 0.001


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_checkpoint(tmp_path)
    cfg = tiny_cfg(peft=PeftSettings(targets="lm-qv", r=4))
    _write_run_config(tmp_path, cfg)
    with pytest.raises(FileNotFoundError, match="no adapter/ folder"):
        load_checkpoint(tmp_path)


def test_local_folder_loads_through_from_pretrained(tmp_path):
    """The hub code path (from_pretrained + AutoProcessor) on a folder: works offline."""
    cfg = tiny_cfg()
    model, processor = build_model(cfg, verbose=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_cfg = ModelConfig(name_or_path=str(tmp_path), peft=PeftSettings(targets="lm-qv", r=4))
    loaded, loaded_processor = build_model(loaded_cfg, verbose=False)
    assert resolve_family(loaded_cfg).name == "blip2-opt"
    batch = caption_collator(loaded_processor, loaded_cfg, 32)([(_image(0), "CT of the chest")])
    expected = caption_collator(processor, cfg, 32)([(_image(0), "CT of the chest")])
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
    # A hub-style config whose language model stops at another token (OPT: "\n" = 50118) still
    # stops at the tokenizer's EOS, which the collator appends to every caption.
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    data["text_config"]["eos_token_id"] = 7
    config_path.write_text(json.dumps(data))
    loaded, loaded_processor = build_model(loaded_cfg, verbose=False)
    stops = loaded.get_base_model().language_model.generation_config.eos_token_id
    assert loaded_processor.tokenizer.eos_token_id in stops and 7 in stops


def test_image_size_override():
    cfg = tiny_cfg(image_size=96)
    model, processor = build_model(cfg, verbose=False)
    batch = caption_collator(processor, cfg, 32)([(_image(0), "CT")])
    assert batch["pixel_values"].shape[-1] == 96
    assert torch.isfinite(model(**batch).loss)
    # A pretrained model is re-gridded in place (LAVIS fine-tunes at 364 px from 224).
    model, _ = build_model(tiny_cfg(), verbose=False)
    resize_vision_positions(model, 96)
    assert model.vision_model.embeddings.position_embedding.shape[1] == (96 // 16) ** 2 + 1
    pixels = torch.randn(1, 3, 96, 96)
    assert model.vision_model(pixels).last_hidden_state.shape[1] == 37
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        resize_vision_positions(model, 81)


def test_collator_truncates_without_eos_and_keeps_special_text_as_text():
    cfg = tiny_cfg()
    model, processor = build_model(cfg, verbose=False)
    tok = processor.tokenizer
    collate = caption_collator(processor, cfg, max_length=16)  # 8 image tokens + <s> + 7 caption tokens
    long_caption = "axial computed tomography of the abdomen showing a large hypodense lesion in the liver"
    batch = collate([(_image(0), long_caption), (_image(1), "MRI")])
    assert batch["input_ids"].shape[1] == 16
    assert collate.truncated == 1
    # The cut caption did not end there: no EOS to learn from it; the short one has its EOS.
    assert tok.eos_token_id not in batch["labels"][0].tolist()
    assert tok.eos_token_id in batch["labels"][1].tolist()
    assert torch.isfinite(model(**batch).loss)
    # "<image>" and "</s>" written in a caption are text: still exactly 8 image tokens, one EOS.
    batch = caption_collator(processor, cfg, max_length=64)([(_image(1), "see <image> and </s> here")])
    assert (batch["input_ids"][0] == model.config.image_token_index).sum() == 8
    assert (batch["labels"][0] == tok.eos_token_id).sum() == 1
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(ValueError, match="raise max_length"):
        caption_collator(processor, cfg, max_length=9)


def test_random_base_fingerprint_catches_a_different_init(tmp_path, monkeypatch):
    from medcap.model import checkpoint

    monkeypatch.setattr(checkpoint, "BASE_WEIGHTS_LIMIT", 0)  # behave like a full-size random model
    cfg = tiny_cfg(peft=PeftSettings(targets="lm-qv", r=4))
    model, _ = build_model(cfg, verbose=False)
    written = save_trainable(model, tmp_path)
    assert "base_fingerprint.txt" in written and "base.safetensors" not in written
    _write_run_config(tmp_path, cfg)
    load_checkpoint(tmp_path)  # same seed, same machine: the same base
    _write_run_config(tmp_path, dataclasses.replace(cfg, init_seed=1))
    with pytest.raises(ValueError, match="differs from the trained one"):
        load_checkpoint(tmp_path)


def test_model_config_from_yaml_and_overrides(tmp_path):
    from medcap.config.loader import load_config

    path = tmp_path / "model.yaml"
    path.write_text(
        "name_or_path: tiny\nprecision: bf16\npeft:\n  method: dora\n  targets: lm-all+qformer-attn\n"
    )
    cfg = load_config(ModelConfig, path, ["--peft.r", "8", "--prompt", "a radiograph of "])
    assert cfg.peft.r == 8 and cfg.peft.method == "dora" and cfg.prompt == "a radiograph of "
    assert resolve_family(cfg).name == "blip2-opt"
    assert resolve_family(ModelConfig(name_or_path="Salesforce/blip2-flan-t5-xl")).name == "blip2-t5"
    with pytest.raises(ConfigError, match="peft.targets"):
        load_config(ModelConfig, path, ["--peft.targets", "lm-al"])
    with pytest.raises(ConfigError, match="quantization"):
        load_config(ModelConfig, path, ["--quantization", "3bit"])


def test_training_forward_builds_no_kv_cache_and_padding_to_eight_changes_nothing():
    """Training forwards skip the KV cache (memory nothing reads) and ``pad_to_multiple_of`` only adds
    masked pads: the loss and every LoRA gradient equal the unpadded, cache-building step's."""
    cfg = tiny_cfg(peft=PeftSettings(targets="lm-all", r=4, dropout=0.0))
    torch.manual_seed(0)
    model, processor = build_model(cfg, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    pairs = [(_image(0), "CT of the chest"), (_image(1), "an axial MRI of the brain with contrast")]
    plain = caption_collator(processor, cfg, 64)(pairs)
    padded = caption_collator(processor, cfg, 64, pad_to_multiple_of=8)(pairs)
    assert (
        padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    )
    assert padded["labels"][:, plain["labels"].shape[1] :].eq(-100).all()
    model.train()
    results = []
    for batch, kw in ((plain, {"use_cache": True}), (padded, {})):
        out = model(**batch, **kw)
        out.loss.backward()
        lm_out = out.language_model_outputs
        results.append((out.loss.detach(), getattr(lm_out, "past_key_values", None)))
        results[-1] += ({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},)
        model.zero_grad(set_to_none=True)
    assert results[0][1] is not None, "an explicit use_cache=True must still build the cache"
    assert results[1][1] is None, "a training forward built a KV cache"
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for n, g in results[0][2].items():
        assert torch.allclose(g, results[1][2][n], atol=1e-6), n
    with torch.no_grad():  # eval forwards keep the model's default (generation relies on the cache)
        model.eval()
        assert model(**plain).language_model_outputs.past_key_values is not None
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        caption_collator(processor, cfg, 64, pad_to_multiple_of=0)


def test_set_cuda_attention_backends_toggles_cudnn_sdpa_and_returns_the_old_setting():
    from medcap.model.cuda import set_cuda_attention_backends

    original = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert set_cuda_attention_backends(cudnn=False) is original
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert set_cuda_attention_backends(cudnn=True) is False
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(original)


def test_cuda_allocator_defaults_respect_the_user_and_need_cuda(monkeypatch):
    from medcap.model.cuda import set_cuda_allocator_defaults

    calls = []
    # CUDA cannot exist here: stand in for the device check and PyTorch's setter, nothing of ours.
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set_cuda_allocator_defaults() is None and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set_cuda_allocator_defaults() == "expandable_segments:True"
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's choice wins
    assert set_cuda_allocator_defaults() is None and len(calls) == 1


def _lora_grads(cfg: ModelConfig, fp32_weights_from=None):
    """Loss and LoRA gradients of one batch; weights copied from ``fp32_weights_from`` if given."""
    torch.manual_seed(0)
    model, processor = build_model(cfg, verbose=False)
    if fp32_weights_from is not None:
        ref = fp32_weights_from.state_dict()
        with torch.no_grad():
            for n, p in model.state_dict().items():
                p.copy_(ref[n].to(p.dtype))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    batch = caption_collator(processor, cfg, 32)(
        [(_image(0), "CT of the chest"), (_image(1), "MRI of the knee")]
    )
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return (
        model,
        float(loss),
        {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad},
    )


def test_cpu_fp32_matmul_of_frozen_bf16_layers_matches_native_bf16_accuracy():
    from medcap.model.cpu import CpuFp32Linear

    lora = PeftSettings(targets="lm-all", r=4)
    ref_model, ref_loss, ref = _lora_grads(tiny_cfg(peft=lora, precision="fp32"))
    results = {}
    for mode in ("on", "off"):
        model, loss, grads = _lora_grads(
            tiny_cfg(peft=lora, precision="bf16", cpu_fp32_matmul=mode), fp32_weights_from=ref_model
        )
        inner = model.get_base_model()
        head = inner.language_model.lm_head
        q = inner.language_model.model.decoder.layers[0].self_attn.q_proj
        if mode == "on":
            # Frozen plain linears (also LoRA's base layer) switch; the trainable adapters compute as usual.
            assert type(head) is CpuFp32Linear and type(q.base_layer) is CpuFp32Linear
            assert q.lora_A["default"].weight.requires_grad  # so it computes exactly as nn.Linear
        else:
            assert type(head) is torch.nn.Linear and type(q.base_layer) is torch.nn.Linear
        diff = torch.cat([(grads[n] - ref[n]).flatten() for n in ref])
        err = float(diff.norm() / torch.cat([ref[n].flatten() for n in ref]).norm())
        results[mode] = (abs(loss - ref_loss), err)
    # The same arithmetic as fp32 up to the bf16 rounding of weights and of the activations between
    # layers, which dominates the difference to the fp32 model either way (measured: loss within
    # 6e-4 of fp32 for both, gradients within 7% in norm for both).
    assert results["on"][0] < 0.01 and results["off"][0] < 0.01
    assert results["on"][1] < 1.25 * results["off"][1] and results["on"][1] < 0.15, results
    # The class switch is invisible to the state dict (checkpoints and exports are unchanged).
    on_model, _, _ = _lora_grads(tiny_cfg(peft=lora, precision="bf16", cpu_fp32_matmul="on"))
    off_model, _, _ = _lora_grads(tiny_cfg(peft=lora, precision="bf16", cpu_fp32_matmul="off"))
    assert on_model.state_dict().keys() == off_model.state_dict().keys()


def test_cpu_fp32_linear_is_plain_linear_when_trainable_or_fp32():
    from medcap.model.cpu import CpuFp32Linear, upcast_frozen_linears_on_cpu

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    assert upcast_frozen_linears_on_cpu(torch.nn.Sequential(layer)) == 1 and type(layer) is CpuFp32Linear
    # Trainable weight: exactly nn.Linear's result and gradients.
    out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    # Frozen: fp32 arithmetic, result in the input's dtype, input gradient in fp32 then rounded.
    layer.requires_grad_(False)
    out = layer(x)
    exact = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact.to(torch.bfloat16))
    (g,) = torch.autograd.grad(out.float().sum(), x)
    assert torch.equal(g, (torch.ones(3, 8) @ layer.weight.float()).to(torch.bfloat16))


def test_image_side_reads_the_processor_size_in_every_form():
    from types import SimpleNamespace

    from medcap.model.family import processor_image_side as image_side

    _, processor = build_model(tiny_cfg(), verbose=False)
    # transformers 5 keeps the size as a SizeDict dataclass: this is what training, the query cache,
    # predict, caption and the service pass to read_image(min_size=...), so a None here means
    # full-size JPEG decoding.
    assert image_side(processor) == 64
    assert image_side(SimpleNamespace(size={"height": 224, "width": 224})) == 224
    assert image_side(SimpleNamespace(size={"shortest_edge": 384})) == 384
    assert image_side(SimpleNamespace(size=364)) == 364
    assert image_side(SimpleNamespace(size=None)) is None
    assert image_side(SimpleNamespace(size={"longest_edge": 512})) is None


def test_first_build_in_a_process_leaves_no_model_behind():
    """The first build imports peft and bitsandbytes, which log an exception; a handler that keeps
    the record (and so that exception's frames) must not keep the model: see import_backends."""
    from tests.fixtures import assert_no_model_left

    assert_no_model_left(
        """
        from medcap.config.model import ModelConfig, PeftSettings
        from medcap.model.build import build_model
        assert "peft" not in sys.modules and "bitsandbytes" not in sys.modules  # the build imports them
        cfg = ModelConfig(name_or_path="tiny", peft=PeftSettings(method="lora"))
        model, processor = build_model(cfg, verbose=False)
        del model, processor
        """
    )
