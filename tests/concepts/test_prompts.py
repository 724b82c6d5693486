"""Concept-guided captioning (``data.prompt_with``): per-example prompts in the collators, and the
phantom test of the mechanism.

The mechanism test trains the tiny BLIP-2 on BLANK phantoms (flat images, real captions) with each
image's ground-truth modality in its prompt: the image cannot tell the modality, so whatever the
captions get right about it came through the prompt. Captions of the held-out test split are then
parsed back (``caption_facts``) with the right modality in the prompt, with none, and with a wrong
one: right far more often with the right one than without, and with a wrong one they follow the prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from medcap.concepts.prompts import guided_prompt, truth_prompts
from medcap.config.model import ModelConfig, PeftSettings
from medcap.data.manifest import read_manifest
from medcap.model.build import build_model
from tests.fixtures import one_thread

_ = one_thread


def test_guided_prompt_words() -> None:
    assert guided_prompt("", modality="ct") == "CT image."
    assert guided_prompt("Describe:", modality="xray") == "X-ray image. Describe:"
    assert guided_prompt("", modality="unknown") == ""
    assert guided_prompt("", concepts=["liver", "mass"]) == "Concepts: liver, mass."


@pytest.mark.parametrize("tiny", ["tiny", "tiny-qwen2.5-vl"])
def test_each_caption_follows_its_own_prompt_and_only_the_caption_is_learned(tiny: str) -> None:
    model, processor = build_model(
        ModelConfig(name_or_path=tiny, peft=PeftSettings(method="none")), verbose=False
    )
    cfg = ModelConfig(name_or_path=tiny, peft=PeftSettings(method="none"))
    collator = model.medcap_family.collator(processor, cfg, 32)
    image = Image.new("RGB", (40, 40), (90, 90, 90))
    prompts = ["CT image.", "Concepts: liver, mass, left side of the abdomen."]
    batch = collator([(image, "axial scan", prompts[0]), (image, "axial scan", prompts[1])])
    tok = processor.tokenizer
    plain = collator([(image, "axial scan")])
    for i, prompt in enumerate(prompts):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        learned = ids[(labels != -100)]
        # The caption (and its end) is all that is learned, the same tokens as without a prompt ...
        assert learned.tolist() == plain["input_ids"][0][plain["labels"][0] != -100].tolist()
        # ... and the prompt text sits in the inputs before it, unlearned.
        before = ids[(labels == -100) & (mask == 1)]
        assert prompt.split()[-1].strip(".") in tok.decode(before, skip_special_tokens=True)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_truth_prompts_from_the_manifest(phantom_prepared: Path) -> None:
    from medcap.concepts.vocab import find_name_table, read_name_table

    rows = read_manifest(phantom_prepared / "train" / "manifest.csv")[:5]
    assert truth_prompts(rows, "none", "") is None
    mods = truth_prompts(rows, "modality", "")
    assert [p.split(" image.")[0] for p in mods] == [
        {"ct": "CT", "mri": "MRI", "xray": "X-ray", "ultrasound": "ultrasound", "angiography": "angiography"}[
            r.modality
        ]
        for r in rows
    ]
    names = read_name_table(find_name_table(phantom_prepared))
    concepts = truth_prompts(rows, "concepts", "", names, k=2)
    assert concepts[0] == "Concepts: " + ", ".join(names[c] for c in rows[0].cuis[:2]) + "."


# ------------------------------------------------------------------------------------------------
# The phantom test of the mechanism
# ------------------------------------------------------------------------------------------------

WORDS = {"ct": "ct", "mri": "mri", "xray": "xray", "ultrasound": "ultrasound", "angiography": "angiography"}


@pytest.mark.usefixtures("one_thread")
def test_modality_in_the_prompt_steers_the_captions_modality(tmp_path: Path) -> None:
    from medcap.cli.data import cmd_prepare
    from medcap.config.run import load_run_config
    from medcap.data.images import read_image
    from medcap.data.phantoms import caption_facts, make_phantoms
    from medcap.infer.generate import caption_images
    from medcap.model.checkpoint import load_checkpoint
    from medcap.train.recipe import fit

    make_phantoms(tmp_path / "ph", 600, seed=1, size_range=(64, 66), blank=True, progress=False)
    prepared = tmp_path / "prep"
    assert cmd_prepare([str(tmp_path / "ph"), "--out", str(prepared), "--color-policy", "all"]) == 0
    settings = {
        "data.prepared": prepared,
        "data.num_workers": 0,
        "data.prompt_with": "modality",
        "model.name_or_path": "tiny",
        "model.full_finetune": "true",
        "model.peft.method": "none",
        "train.out_dir": tmp_path / "run",
        "train.cpu_threads": 1,
        "train.batch_size": 32,
        "train.max_steps": 150,
        "train.lr": 2e-3,
        "train.warmup_steps": 10,
        "train.weight_decay": 0.0,
        "train.eval_at_epoch_end": "false",
        "train.num_sample_captions": 2,
        "train.log_every": 50,
        "train.progress_bar": "false",
        "train.report_to": "csv",
        "generate.max_new_tokens": 12,
    }
    cfg = load_run_config(None, [x for k, v in settings.items() for x in (f"--{k}", str(v))])
    fit(cfg)
    model, processor, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    rows = read_manifest(prepared / "test" / "manifest.csv")
    images = [read_image(r.image) for r in rows]
    modalities = sorted({r.modality for r in rows})
    wrong = [modalities[(modalities.index(r.modality) + 1) % len(modalities)] for r in rows]

    def said(prompts: list[str] | str) -> list[str | None]:
        with torch.no_grad():
            return [
                caption_facts(c)["modality"]
                for c in caption_images(model, processor, images, cfg.generate, prompts)
            ]

    right = said(truth_prompts(rows, "modality", ""))
    none = said("")
    misled = said([guided_prompt("", modality=m) for m in wrong])
    n = len(rows)
    right_rate = sum(s == WORDS[r.modality] for s, r in zip(right, rows, strict=True)) / n
    none_rate = sum(s == WORDS[r.modality] for s, r in zip(none, rows, strict=True)) / n
    follow_rate = sum(s == WORDS[w] for s, w in zip(misled, wrong, strict=True)) / n
    misled_truth = sum(s == WORDS[r.modality] for s, r in zip(misled, rows, strict=True)) / n
    print(
        f"modality right: prompt {right_rate:.2f}, none {none_rate:.2f}; wrong prompt followed {follow_rate:.2f}"
    )
    assert right_rate >= 0.9
    assert none_rate <= 0.5 and right_rate - none_rate >= 0.4
    assert follow_rate >= 0.8 and misled_truth <= 0.1


def test_predict_and_serve_take_the_prompt_from_a_concept_model(
    phantom_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medcap.cli.infer import cmd_predict
    from medcap.concepts.train import fit_concepts
    from medcap.config.concepts import load_concepts_config
    from medcap.config.run import load_run_config
    from medcap.data.images import read_image
    from medcap.infer.generate import caption_images, load_captioner
    from medcap.infer.serve.loading import load_for_serving
    from medcap.train.recipe import fit
    from tests.concepts.conftest import concept_overrides
    from tests.fixtures import tiny_overrides

    run, crun = tmp_path / "run", tmp_path / "crun"
    over = tiny_overrides(phantom_prepared, run, max_steps=2, epochs=1)
    fit(load_run_config(None, [*over, "--data.prompt_with", "modality"]))
    fit_concepts(
        load_concepts_config(None, concept_overrides(phantom_prepared, crun, **{"train.max_steps": 2}))
    )

    # Without the concept model the prompts cannot be made: refused, saying what to pass.
    assert cmd_predict(["--checkpoint", str(run), "--split", "valid", "--limit", "2"]) == 2
    assert "--concepts" in capsys.readouterr().err
    assert (
        cmd_predict(["--checkpoint", str(run), "--split", "valid", "--limit", "2", "--concepts", str(crun)])
        == 0
    )

    cap = load_captioner(checkpoint=run, concepts=crun, device="cpu")
    rows = read_manifest(phantom_prepared / "valid" / "manifest.csv")[:3]
    images = [read_image(r.image) for r in rows]
    found = cap.guide.predictor.predict(images)
    prompts = [guided_prompt(cap.prompt, modality=f.modality) for f in found]
    assert all(p.endswith("image.") for p in prompts)
    assert cap.caption(images) == caption_images(cap.model, cap.processor, images, cap.gen, prompts)
    # The service gets the same guide (its caption function puts the prompts in).
    *_, info = load_for_serving(checkpoint=run, device="cpu", concepts=crun)
    assert info["guide"].how == "modality" and info["prompt_with"] == "modality"
