"""The image-text-to-text families (Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, PaliGemma, Gemma 3, Idefics3 /
SmolVLM, InstructBLIP with Vicuna and with Flan-T5) through the same checks, each on its tiny model:
the protocol and its LoRA scopes, labels, truncation that never cuts image tokens, batched generation
equal to one image at a time, a checkpoint round trip, a merged export that plain transformers loads,
grey and 16-bit images, and each family's image limits and pixel settings."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from medcap.config.generate import GenerateConfig
from medcap.config.loader import ConfigError, to_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.data.images import read_image
from medcap.infer.generate import caption_images, generate_token_ids
from medcap.model.adapters import unwrap
from medcap.model.build import build_model
from medcap.model.checkpoint import load_checkpoint, save_trainable
from medcap.model.families import FAMILIES, resolve_family
from medcap.model.families.vlm.family import ImageLimitError, VlmFamily
from medcap.model.family import ModelFamily
from medcap.plan.memory import component

VLM = [f for f in FAMILIES if isinstance(f, VlmFamily)]
IDS = [f.name for f in VLM]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg_of(family: VlmFamily, **kw) -> ModelConfig:
    peft = kw.pop("peft", PeftSettings(method="none"))
    if peft.method == "none" and not any(k.startswith("train_") for k in kw):
        kw.setdefault("full_finetune", True)
    return ModelConfig(name_or_path=family.tiny_names[0], peft=peft, **kw)


def image(kind: int, size: tuple[int, int] = (72, 64)) -> Image.Image:
    """A bright disc left (0) or right (1) on a dark field."""
    w, h = size
    im = Image.new("RGB", size, (20, 20, 20))
    x = w // 4 if kind == 0 else 3 * w // 4
    ImageDraw.Draw(im).ellipse((x - 10, h // 2 - 10, x + 10, h // 2 + 10), fill=(230, 230, 230))
    return im


def image_token_count(family: VlmFamily, processor, input_ids: torch.Tensor) -> int:
    """Tokens the model fills with image features (what a length cut must never touch)."""
    image_id = unwrap_config_image_token(family, processor)
    return int((input_ids == image_id).sum())


def unwrap_config_image_token(family: VlmFamily, processor) -> int:
    tok = processor.tokenizer
    token = getattr(processor, "image_token", None) or "<image>"
    token = getattr(token, "content", token)
    if family.name == "gemma3":
        token = tok.image_token
    return tok.convert_tokens_to_ids(token)


def test_every_family_is_registered_with_a_tiny_model():
    assert {f.name for f in VLM} == {
        "qwen2.5-vl",
        "qwen3-vl",
        "llava-next",
        "paligemma",
        "gemma3",
        "idefics3",
        "instructblip",
        "instructblip-t5",
    }


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_protocol_and_scoped_presets(family):
    """Every preset matches linears, and only in its scope: lm-* in the language model, vision in the
    vision tower, projector in the projector, qformer-* in the Q-Former."""
    from medcap.model.adapters import resolve_targets

    assert isinstance(family, ModelFamily)
    cfg = cfg_of(family)
    assert resolve_family(cfg) is family
    model, _ = build_model(cfg, verbose=False)
    scope = {
        "vision": "vision",
        "projector": "projection",
        "qformer-qv": "qformer",
        "qformer-attn": "qformer",
    }
    for preset in family.target_presets:
        _, matched = resolve_targets(model, PeftSettings(targets=preset), family)
        assert matched, preset
        parts = {component(name, family) for name in matched}
        assert parts == {scope.get(preset, "lm")}, (preset, parts)
    assert {"lm-qv", "lm-attn", "lm-all", "vision"} <= set(family.target_presets)


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_labels_are_the_caption_and_its_end_tokens_only(family):
    cfg = cfg_of(family, prompt="Describe the image.")
    model, processor = build_model(cfg, verbose=False)
    collator = family.collator(processor, cfg, 64)
    captions = ["CT of the head with a mass on the left", "MRI"]
    # Different sizes: dynamic-resolution families give the two images different token counts.
    batch = collator([(image(0, (72, 64)), captions[0]), (image(1, (64, 100)), captions[1])])
    layout = family.layout(processor, cfg.prompt)
    tok = processor.tokenizer
    for row, caption in enumerate(captions):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        caption_ids = tok(layout.caption_prefix + caption, add_special_tokens=False)["input_ids"]
        assert kept == caption_ids + list(layout.end_ids)
        if family.decoder_only:
            positions = (labels != -100).nonzero().flatten()
            assert torch.equal(batch["input_ids"][row, positions], labels[positions])
            # The labelled tokens are the last real ones: nothing after them but padding.
            last = int(batch["attention_mask"][row].sum())
            assert int(positions[-1]) == last - 1
    assert (
        tok.decode(batch["labels"][0][batch["labels"][0] != -100][: -len(layout.end_ids)]).strip()
        == captions[0]
    )
    # Per-token processor outputs were extended over the caption: same shape as input_ids.
    for name in layout.token_fields:
        assert batch[name].shape == batch["input_ids"].shape
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_a_long_caption_is_cut_and_counted_but_never_the_image_tokens(family):
    cfg = cfg_of(family)
    model, processor = build_model(cfg, verbose=False)
    collator = family.collator(processor, cfg, 5)
    long = "a very long caption " * 30
    batch = collator([(image(0), long), (image(1), "short")])
    assert collator.truncated == 1
    labels = batch["labels"][0]
    assert int((labels != -100).sum()) == 5  # cut: five caption tokens, no end token
    prompt_only = family.generation_inputs(processor, [image(0)], "")
    if family.decoder_only:
        want = image_token_count(family, processor, prompt_only["input_ids"])
        assert want > 0
        assert image_token_count(family, processor, batch["input_ids"][:1]) == want
    # The forward checks that image features and image tokens match: it would raise otherwise.
    model.train()
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_batched_generation_equals_one_image_at_a_time(family):
    cfg = cfg_of(family)
    model, processor = build_model(cfg, verbose=False)
    images = [image(0), image(1, (96, 64)), image(0, (64, 120)), image(1)]
    gen = GenerateConfig(batch_size=4, max_new_tokens=6)
    together = generate_token_ids(model, processor, images, gen)
    alone = [
        generate_token_ids(model, processor, [im], GenerateConfig(batch_size=1, max_new_tokens=6))[0]
        for im in images
    ]
    assert together == alone
    assert all(len(ids) > 0 for ids in together)


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_checkpoint_round_trip_gives_identical_outputs(family, tmp_path):
    cfg = cfg_of(family, peft=PeftSettings(targets="lm-attn+vision", r=4))
    model, processor = build_model(cfg, verbose=False)
    batch = family.collator(processor, cfg, 16)([(image(0), "CT of the chest"), (image(1), "MRI")])
    with torch.no_grad():  # LoRA B starts at zero: give the adapters weights so they matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    ckpt = tmp_path / "ckpt"
    save_trainable(model, ckpt)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    loaded, _, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_merged_export_loads_with_plain_transformers(family, tmp_path):
    """The merged model loads with the family's transformers class (by its name) and its processor
    parts with the Auto classes, and captions as medcap's model does."""
    import transformers

    from medcap.infer.export import export

    cfg = cfg_of(family, peft=PeftSettings(targets="lm-attn", r=4))
    model, processor = build_model(cfg, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    ckpt = tmp_path / "run" / "checkpoints" / "best"
    save_trainable(model, ckpt)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    out = export(ckpt, tmp_path / "merged", merge=True)
    model_class, processor_class = family.export_classes
    plain = getattr(transformers, model_class).from_pretrained(out)
    config = (
        json.loads((out / "processor_config.json").read_text())
        if (out / "processor_config.json").is_file()
        else {}
    )
    assert config.get("processor_class", processor_class) == processor_class
    ip = transformers.AutoImageProcessor.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(ip).__name__ == type(processor.image_processor).__name__ and len(tok) == len(
        processor.tokenizer
    )
    # medcap reads the same folder as a base model (its family from config.json) and captions alike.
    reloaded, reprocessor = build_model(
        ModelConfig(name_or_path=str(out), peft=PeftSettings(method="none")), verbose=False
    )
    assert reloaded.medcap_family is family and type(unwrap(reloaded)) is type(plain)
    gen = GenerateConfig(max_new_tokens=5)
    assert caption_images(reloaded, reprocessor, [image(0)], gen) == caption_images(
        model, processor, [image(0)], gen
    )


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("family", VLM, ids=IDS)
def test_grey_and_16_bit_images_caption_and_train(family):
    grey = Image.new("L", (70, 64), 30)
    ImageDraw.Draw(grey).ellipse((10, 20, 30, 40), fill=220)
    deep = Image.fromarray((np.linspace(0, 65535, 64 * 80).reshape(64, 80)).astype(np.uint16))
    images = [read_image(_png(grey), "grey.png"), read_image(_png(deep), "deep.png")]
    assert deep.mode.startswith("I") and all(im.mode == "RGB" for im in images)
    cfg = cfg_of(family)
    model, processor = build_model(cfg, verbose=False)
    assert len(caption_images(model, processor, images, GenerateConfig(max_new_tokens=3))) == 2
    batch = family.collator(processor, cfg, 8)([(images[0], "grey"), (images[1], "deep")])
    model.train()
    assert torch.isfinite(model(**batch).loss)


# --- dynamic resolution ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-idefics3", "tiny-llava-next"])
def test_visual_tokens_and_activation_memory_follow_max_pixels(name):
    """A lower pixel cap gives fewer image tokens for the same large image, and the planner's
    activation memory for the same config follows (the out-of-memory cause of these models)."""
    from medcap import plan as plan_lib
    from medcap.config.run import RunConfig
    from medcap.config.train import TrainConfig

    big = image(0, (400, 400))
    counts, activations = [], []
    family = resolve_family(ModelConfig(name_or_path=name, peft=PeftSettings(method="none")))
    unit = {"tiny-qwen2.5-vl": 16, "tiny-qwen3-vl": 16, "tiny-idefics3": 48, "tiny-llava-next": 48}[name]
    caps = [(4 * unit) ** 2, (2 * unit) ** 2] if name != "tiny-llava-next" else [(2 * unit) ** 2, 2 * unit**2]
    for cap in caps:
        cfg = ModelConfig(name_or_path=name, max_pixels=cap, peft=PeftSettings(targets="lm-attn"))
        model, processor = build_model(cfg, verbose=False)
        enc = family.generation_inputs(processor, [big], "")
        counts.append(image_token_count(family, processor, enc["input_ids"]))
        p = plan_lib.plan(RunConfig(model=cfg, train=TrainConfig(batch_size=2)), "cpu")
        activations.append(p.memory.activations)
    assert counts[1] < counts[0], counts
    assert activations[1] < activations[0], activations


def test_max_pixels_reaches_training_predict_and_the_service(tmp_path):
    """The cap is part of the checkpoint's config: the captioner predict and the service load has it."""
    from medcap.infer.generate import load_captioner

    cfg = ModelConfig(
        name_or_path="tiny-qwen2.5-vl", max_pixels=32 * 32, peft=PeftSettings(targets="lm-qv", r=4)
    )
    model, processor = build_model(cfg, verbose=False)
    assert processor.image_processor.size.longest_edge == 32 * 32
    ckpt = tmp_path / "ckpt"
    save_trainable(model, ckpt)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    cap = load_captioner(checkpoint=ckpt, device="cpu")
    assert cap.processor.image_processor.size.longest_edge == 32 * 32
    assert cap.image_side == 32
    enc = cap.family.generation_inputs(cap.processor, [image(0, (400, 400))], "")
    assert int(enc["image_grid_thw"].prod(-1).sum()) <= 32 * 32 // 64  # 8 px patches


def test_an_image_beyond_the_family_limit_is_refused_naming_the_limit():
    cfg = cfg_of(
        resolve_family(ModelConfig(name_or_path="tiny-qwen2.5-vl", peft=PeftSettings(method="none")))
    )
    model, processor = build_model(cfg, verbose=False)
    strip = Image.new("RGB", (2010, 10))
    with pytest.raises(ImageLimitError, match=r"2010 x 10 px image: Qwen-VL takes aspect ratios up to 200:1"):
        caption_images(model, processor, [strip])
    with pytest.raises(ImageLimitError, match="200:1"):
        model.medcap_family.collator(processor, cfg, 8)([(strip, "x")])


@pytest.mark.parametrize(
    ("name", "setting", "message"),
    [
        ("tiny-paligemma", {"max_pixels": 10_000}, "does not apply to PaliGemma"),
        ("tiny-gemma3", {"min_pixels": 100}, "does not apply to Gemma 3"),
        ("tiny-qwen2.5-vl", {"image_size": 64}, "bound it with model.min_pixels / model.max_pixels"),
        ("tiny-qwen2.5-vl", {"max_pixels": 100}, "less than one 16 x 16 px unit"),
        ("tiny-idefics3", {"max_pixels": 100}, "less than one 48 x 48 px tile"),
        ("tiny-instructblip", {"max_pixels": 10_000}, "does not apply to InstructBLIP"),
    ],
)
def test_image_settings_a_family_cannot_honour_are_refused(name, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(
            ModelConfig(name_or_path=name, peft=PeftSettings(method="none"), **setting), verbose=False
        )


def test_min_pixels_above_max_pixels_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="min_pixels 5000 is more than model.max_pixels 1000"):
        ModelConfig(name_or_path="tiny-qwen2.5-vl", min_pixels=5000, max_pixels=1000)


def test_hub_ids_and_config_files_map_to_their_families(tmp_path: Path):
    none = PeftSettings(method="none")
    for hub_id, name in [
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl"),
        ("Qwen/Qwen3-VL-4B-Instruct", "qwen3-vl"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-next"),
        ("google/paligemma2-3b-pt-224", "paligemma"),
        ("google/medgemma-4b-it", "gemma3"),
        ("HuggingFaceTB/SmolVLM-Instruct", "idefics3"),
        ("Salesforce/instructblip-vicuna-7b", "instructblip"),
        ("Salesforce/instructblip-flan-t5-xl", "instructblip-t5"),
        ("someone/my-qwen2.5-vl-finetune", "qwen2.5-vl"),  # not shipped: by its name
    ]:
        assert resolve_family(ModelConfig(name_or_path=hub_id, peft=none)).name == name, hub_id
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "instructblip", "text_config": {"model_type": "t5"}})
    )
    assert resolve_family(ModelConfig(name_or_path=str(folder), peft=none)).name == "instructblip-t5"


def test_the_build_prints_each_scope_with_its_module_count(capsys):
    build_model(
        ModelConfig(name_or_path="tiny-qwen2.5-vl", peft=PeftSettings(targets="lm-all+vision+projector")),
        verbose=True,
    )
    out = capsys.readouterr().out
    # 2 LM layers x 7 linears, 2 vision blocks x 5, the merger's 2.
    assert "peft lora r=16 on 26 modules (lm-all 14, vision 10, projector 2):" in out


@pytest.mark.parametrize("name", [*(f.tiny_names[0] for f in VLM), "tiny"])
def test_checkpointing_leaves_a_frozen_vision_tower_out_of_the_backward_pass(name):
    """transformers' and peft's input-embedding hooks would pull the frozen vision tower into the
    autograd graph (activations kept, a backward through every frozen layer); build_model removes
    them, and the adapters still get their gradients (non-reentrant checkpointing)."""
    from medcap.model.families import resolve_family

    cfg = ModelConfig(name_or_path=name, gradient_checkpointing=True, peft=PeftSettings(targets="lm-qv", r=4))
    family = resolve_family(cfg)
    model, processor = build_model(cfg, verbose=False)
    vision = next(
        m
        for n, m in unwrap(model).named_modules()
        if n.startswith(family.parts["vision"]) and n.count(".") <= 3 and list(m.parameters())
    )
    seen = []
    handle = vision.register_forward_hook(
        lambda m, i, o: seen.append(
            (o[0] if isinstance(o, tuple) else getattr(o, "last_hidden_state", o)).requires_grad
        )
    )
    if isinstance(family, VlmFamily):
        batch = family.collator(processor, cfg, 8)([(image(0), "a small mass"), (image(1), "none")])
    else:
        from tests.fixtures import caption_collator

        batch = caption_collator(processor, cfg, 64)([(image(0), "a small mass"), (image(1), "none")])
    model.train()
    out = model(**batch) if family.decoder_only else model(**batch)
    handle.remove()
    assert seen and not any(seen), seen
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
