"""Every image-text-to-text family learns from the image (issue 13), on its tiny model.

Each family's tiny model is trained from scratch on phantom images and, the same way, on the
phantoms' blank variant (flat images, the same captions). Then its loss is read on the validation
captions' tokens that only the image decides: the first token of the modality word ("CT", "MRI",
"radiograph" ...), of the region word ("head", "chest" ...) and of the side ("left", "right").
A model that sees the image predicts them far better than one that can only learn which words
follow which; if the image were dropped anywhere between the reader, the processor, the collator
and the language model (the image tokens cut, the features never scattered), both would score alike.

The two trainings run side by side in two worker processes of one torch thread each (the models are
tiny). 150 steps at batch 16 take 15-40 s a family on two free cores and about twice that on a
loaded box; the full fact-accuracy check (captions generated and parsed back, as
tests/train/test_learns.py does for BLIP-2) is the slow test at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from medcap.model.families import FAMILIES
from medcap.model.families.vlm.family import VlmFamily

VLM = [f for f in FAMILIES if isinstance(f, VlmFamily)]

#: The first mention of each fact that only the image decides (the phantom captions' wordings).
FACT_PATTERNS = {
    "modality": r"\bangiogra\w*|\bdsa\b|\bultraso\w*|\bdoppler\b|\bmri\b|\bmr\b|\bct\b|\bx-ray\b|\bradiograph\w*",
    "region": r"\bhead\b|\bneck\b|\bchest\b|\bknees?\b|\babdom\w*",
    "side": r"\bleft\b|\bright\b",
}

STEPS, BATCH, LR, CAPTION_TOKENS = 150, 16, 3e-3, 24


def make_data(root: str) -> None:
    """Phantoms (400: 280 train, 60 valid, 60 test) and their blank variant, prepared."""
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    for kind in ("images", "blank"):
        base = Path(root) / kind
        make_phantoms(base / "raw", 400, seed=0, size_range=(64, 72), blank=kind == "blank", progress=False)
        prepare_dataset(base / "raw", base / "prepared", color_policy="all", progress=False)


def train_and_read_fact_losses(prepared: str, name: str) -> dict[str, float]:
    """Train the tiny model ``name`` on ``prepared`` (full fine-tune, AdamW, constant rate after a
    20-step warmup) and return its mean loss on the image-decided tokens of the validation captions."""
    import random

    import torch

    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.data.images import read_image
    from medcap.data.manifest import read_manifest
    from medcap.model.build import build_model
    from medcap.train.loss import batch_loss, label_token_count

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = read_manifest(Path(prepared) / "train" / "manifest.csv")
    valid = read_manifest(Path(prepared) / "valid" / "manifest.csv")
    cfg = ModelConfig(name_or_path=name, full_finetune=True, peft=PeftSettings(method="none"))
    model, processor = build_model(cfg, verbose=False)
    family = model.medcap_family
    collator = family.collator(processor, cfg, CAPTION_TOKENS)
    images = {r.id: read_image(r.image) for r in train + valid}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    rng = random.Random(0)
    model.train()
    for _ in range(STEPS):
        batch = collator([(images[r.id], r.caption) for r in rng.sample(train, BATCH)])
        loss = batch_loss(model, batch, family.decoder_only, None) / label_token_count(
            batch["labels"], family.decoder_only
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    return fact_token_losses(model, processor, family, collator, [(images[r.id], r.caption) for r in valid])


def fact_token_losses(model, processor, family, collator, pairs) -> dict[str, float]:
    """Mean cross-entropy of the first token of each fact's first mention in the captions."""
    import torch

    layout = family.layout(processor, model.medcap_config.prompt)
    sums = dict.fromkeys(FACT_PATTERNS, 0.0)
    counts = dict.fromkeys(FACT_PATTERNS, 0)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), 16):
            chunk = pairs[start : start + 16]
            batch = collator(chunk)
            labels = batch.pop("labels")
            if not family.decoder_only:
                batch["labels"] = labels
            logits = model(**batch).logits.float()
            for row, (_, caption) in enumerate(chunk):
                text = layout.caption_prefix + caption
                offsets = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
                    "offset_mapping"
                ]
                first = int((labels[row] != -100).nonzero()[0])
                for fact, pattern in FACT_PATTERNS.items():
                    match = re.search(pattern, text.lower())
                    k = match and next((i for i, (_, end) in enumerate(offsets) if end > match.start()), None)
                    if k is None or k >= CAPTION_TOKENS:
                        continue
                    position = first + k
                    # Decoder-only: the token at t is predicted at t - 1; T5's logits align with labels.
                    at = position - 1 if family.decoder_only else position
                    log_probs = torch.log_softmax(logits[row, at], dim=-1)
                    sums[fact] -= float(log_probs[labels[row, position]])
                    counts[fact] += 1
    out = {fact: sums[fact] / max(counts[fact], 1) for fact in FACT_PATTERNS}
    out["pooled"] = sum(sums.values()) / max(sum(counts.values()), 1)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two spawned workers of one torch thread each, and the prepared phantoms (made in a worker)."""
    context = multiprocessing.get_context("spawn")  # a fork of a process that ran torch can deadlock
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    root = tmp_path_factory.mktemp("learns")
    try:
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as executor:
            executor.submit(make_data, str(root)).result()
            yield executor, root
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Variants that share a family's layer with one checked by default (Qwen3-VL with Qwen2.5-VL,
#: InstructBLIP's Flan-T5 with its decoder-only sibling) run with -m slow: keeps the default run
#: under 15 minutes on 2 cores.
SLOW_VARIANTS = {"qwen3-vl", "instructblip-t5"}
DEFAULT_RUN = [
    pytest.param(f, id=f.name, marks=pytest.mark.slow)
    if f.name in SLOW_VARIANTS
    else pytest.param(f, id=f.name)
    for f in VLM
]


@pytest.mark.parametrize("family", DEFAULT_RUN)
def test_loss_on_the_tokens_only_the_image_decides_falls_below_a_blank_image_baseline(pool, family):
    executor, root = pool
    name = family.tiny_names[0]
    runs = {
        kind: executor.submit(train_and_read_fact_losses, str(root / kind / "prepared"), name)
        for kind in ("images", "blank")
    }
    images, blank = runs["images"].result(), runs["blank"].result()
    print(f"\n{family.name}: loss on image-decided tokens, images / blank")
    for fact in (*FACT_PATTERNS, "pooled"):
        print(f"  {fact:<9} {images[fact]:.3f} / {blank[fact]:.3f}")
    # Measured on the 2-core box shared with other jobs (about 60 s a family), images / blank:
    # modality 0.60 / 1.38 (qwen2.5-vl), 0.64 / 1.31 (qwen3-vl), 0.87 / 1.69 (llava-next), 0.74 / 1.62
    # (paligemma), 0.81 / 1.37 (gemma3), 0.76 / 1.52 (idefics3), 0.83 / 1.26 (instructblip), 0.79 /
    # 1.43 (instructblip-t5); pooled with region and side 0.71-0.85 against 1.09-1.26. Side is not
    # learned yet at 150 steps (0.74-1.01 both ways; BLIP-2's tiny model needed 750): the slow test
    # trains long enough for it.
    assert images["modality"] <= 0.75 * blank["modality"], (images, blank)
    assert images["pooled"] <= 0.85 * blank["pooled"], (images, blank)


@pytest.mark.slow
@pytest.mark.parametrize("family", VLM, ids=[f.name for f in VLM])
def test_captions_state_the_image_facts_far_more_often_than_a_blank_trained_model(tmp_path, family):
    """The full check of tests/train/test_learns.py (750 steps, captions generated for the held-out
    test split and parsed back into facts) for each family's tiny model."""
    from tests.train.test_learns import FACTS, train_and_score

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as executor:
        runs = {
            kind: executor.submit(
                train_and_score,
                str(tmp_path / kind),
                kind == "blank",
                {"model.name_or_path": family.tiny_names[0]},
            )
            for kind in ("images", "blank")
        }
        images, blank = runs["images"].result(), runs["blank"].result()
    for fact in (*FACTS, "side_from_image"):
        print(f"{family.name} {fact:<16} {images[fact]:7.3f} {blank[fact]:7.3f}")
    assert images["modality"] >= blank["modality"] + 0.4, (images, blank)
    assert images["region"] >= blank["region"] + 0.3, (images, blank)
    mean = lambda scores: sum(scores[f] for f in FACTS) / len(FACTS)  # noqa: E731
    assert mean(images) >= mean(blank) + 0.2, (images, blank)
