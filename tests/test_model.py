"""Tests of the BLIP-2 factory, the caption collator, PEFT presets and checkpoints (tiny models)."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image, ImageDraw

from medcap.config import ConfigError
from medcap.model import (
    CaptionCollator,
    ModelConfig,
    PeftSettings,
    build_model,
    count_parameters,
    decode_captions,
    generation_inputs,
)


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
    collate = CaptionCollator(processor, cfg, max_length=64)
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
    collate = CaptionCollator(processor, cfg, max_length=32)
    a = collate([(_image(0), "a bright disc")])
    b = collate([(_image(1), "a bright disc")])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        la, lb = model(**a), model(**b)
    assert not torch.allclose(la.logits, lb.logits)
    assert la.loss.item() != lb.loss.item()


def test_generation_inputs_and_decode():
    cfg = tiny_cfg(prompt="a photo of")
    model, processor = build_model(cfg, verbose=False)
    inputs = generation_inputs(processor, [_image(0), _image(1)], cfg.prompt, "blip2-opt")
    n_query = processor.num_query_tokens
    assert (inputs["input_ids"][:, :n_query] == model.config.image_token_index).all()
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt_len
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    texts = decode_captions(processor, out, prompt_len, "blip2-opt")
    assert len(texts) == 2 and all("a photo of" not in t for t in texts)


def test_tiny_t5_builds_and_computes_loss():
    cfg = tiny_cfg(name_or_path="tiny-t5", prompt="describe:")
    model, processor = build_model(cfg, verbose=False)
    collate = CaptionCollator(processor, cfg, max_length=32)
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
