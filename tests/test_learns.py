"""The proof that training learns from the images (issue 3).

The tiny BLIP-2 is trained from scratch on phantom images, and the same model with the same settings
on the phantoms' blank variant (flat images, same captions, sizes and stored modes). Captions
generated for the held-out test split are parsed back into facts (modality, region, side, finding)
with ``medcap.phantoms.caption_facts``. A model that sees the images must state the facts of each
image far more often than one that can only learn the caption distribution: if the image were
silently dropped anywhere between the manifest and the language model, both runs would score alike.

Measured on this 2-core box (shared with other jobs, load average about 3): the pair took 202 s
of wall time and 199 s of CPU (one torch thread, decoding in one loader worker), so about 2-2.5
minutes on two free cores; the scores are identical from run to run on this machine. The gap comes from modality, region and finding; lesion side is not learned in this budget
(FACTS 3: fine facts need many more steps), so it is not held to the blank model's level.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_fixtures import one_thread

from medcap.data import cli_prepare, load_image, read_manifest
from medcap.generate import caption_images
from medcap.model import load_checkpoint
from medcap.phantoms import caption_facts, make_phantoms
from medcap.train import fit, load_run_config

FACTS = ("modality", "region", "side", "finding")
_ = one_thread  # imported for pytest to find


def _prepared(root: Path, blank: bool) -> Path:
    # 1,000 images: 700 train, 150 valid, 150 test (every 4th test image a held-out combination).
    make_phantoms(root / "phantoms", 1000, seed=0, size_range=(64, 72), blank=blank, progress=False)
    assert (
        cli_prepare([str(root / "phantoms"), "--out", str(root / "prepared"), "--color-policy", "all"]) == 0
    )
    return root / "prepared"


def _train_and_score(prepared: Path, run: Path) -> dict[str, float]:
    overrides = {
        "data.prepared": prepared,
        "data.num_workers": 1,  # decoding overlaps with the step on the other core
        "model.name_or_path": "tiny",
        "model.full_finetune": "true",
        "model.peft.method": "none",
        "train.out_dir": run,
        "train.batch_size": 32,
        "train.max_steps": 300,
        "train.lr": 2e-3,
        "train.warmup_steps": 20,
        "train.weight_decay": 0.0,
        "train.eval_at_epoch_end": "false",  # one validation, at the end
        "train.num_sample_captions": 2,
        "train.log_every": 50,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "generate.max_new_tokens": 40,
    }
    cfg = load_run_config(None, [x for k, v in overrides.items() for x in (f"--{k}", str(v))])
    fit(cfg)
    # Caption through the saved checkpoint, as `medcap predict` would.
    model, processor, _ = load_checkpoint(run / "checkpoints" / "best")
    rows = read_manifest(prepared / "test" / "manifest.csv")
    preds: list[str] = []
    with torch.no_grad():
        for i in range(0, len(rows), 50):
            images = [load_image(r.image) for r in rows[i : i + 50]]
            preds += caption_images(model, processor, images, cfg.generate, cfg.model.prompt)
    hits = dict.fromkeys(FACTS, 0)
    for row, pred in zip(rows, preds, strict=True):
        want, got = caption_facts(row.caption), caption_facts(pred)
        for fact in FACTS:
            hits[fact] += want[fact] is not None and want[fact] == got[fact]
    for row, pred in list(zip(rows, preds, strict=True))[:3]:
        print(f"  reference:  {row.caption}\n  prediction: {pred}")
    return {fact: hits[fact] / len(rows) for fact in FACTS}


@pytest.mark.usefixtures("one_thread")
def test_captions_state_the_image_facts_far_more_often_than_a_blank_trained_model(tmp_path: Path) -> None:
    images = _train_and_score(_prepared(tmp_path / "images", blank=False), tmp_path / "images" / "run")
    blank = _train_and_score(_prepared(tmp_path / "blank", blank=True), tmp_path / "blank" / "run")
    print(f"\n{'fact':<10} {'images':>7} {'blank':>7}")
    for fact in FACTS:
        print(f"{fact:<10} {images[fact]:7.3f} {blank[fact]:7.3f}")
    mean_images = sum(images.values()) / len(FACTS)
    mean_blank = sum(blank.values()) / len(FACTS)
    print(f"{'mean':<10} {mean_images:7.3f} {mean_blank:7.3f}")
    # The blank model can only guess the most frequent value of each fact; the image model reads
    # the modality, region and finding off the picture.
    # Measured here (tiny init std 0.05): modality 0.71 vs 0.23, region 0.67 vs 0.20, finding 0.65 vs
    # 0.46, side 0.39 vs 0.49 (not learned in 300 steps: the image model's side guesses are noise
    # around chance, so side is left out of the per-fact check); mean 0.61 vs 0.35. 150 test images:
    # a proportion's standard error is about 0.04, so the margins below are several of them, and a
    # dropped image (both runs blank-like) fails the first three.
    assert images["modality"] >= blank["modality"] + 0.3, (images, blank)
    assert images["region"] >= blank["region"] + 0.2, (images, blank)
    assert mean_images >= mean_blank + 0.12, (images, blank)
    assert images["finding"] >= blank["finding"] - 0.05, (images, blank)
