"""The planner for the image-text-to-text families: the activation formulas against what autograd
really keeps (each family's tiny model, counted with saved_tensors_hooks as tests/plan/test_plan.py
does for BLIP-2), and a plan for every tiny model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medcap import plan as plan_lib
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.run import RunConfig
from medcap.config.train import TrainConfig
from medcap.model.build import build_model
from medcap.model.families import FAMILIES
from medcap.model.families.vlm.family import VlmFamily
from medcap.plan.memory import act_dtypes, trainable_parameters
from tests.plan.test_plan import _saved_bytes

VLM = [f for f in FAMILIES if isinstance(f, VlmFamily) and f.decoder_only]

#: (precision, LoRA targets, LoRA dropout, tolerance). The language-model formulas are exact up to
#: the q/k norms of the first layer (Qwen3, Gemma 3: +5%) and fp32 eager attention (PaliGemma 2);
#: the vision towers' within 10%.
REGIMES = {
    "bf16-lm-qv": ("bf16", "none", "no", "lm-qv", 0.05, 0.06),
    "fp32-lm-all-nodrop": ("fp32", "none", "no", "lm-all", 0.0, 0.06),
    "bf16-lm-attn+vision": ("bf16", "none", "no", "lm-attn+vision", 0.05, 0.10),
    # QLoRA as the shipped configs train it: 4-bit base, fp32 norms/embeddings/lm_head (cast by
    # prepare_model_for_kbit_training), autocast bf16.
    "4bit-autocast-bf16-lm-all": ("bf16", "4bit", "bf16", "lm-all", 0.05, 0.06),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("family", VLM, ids=[f.name for f in VLM])
def test_activation_formula_matches_saved_tensors(family, regime):
    precision, quantization, mp, targets, dropout, tolerance = REGIMES[regime]
    cfg = ModelConfig(
        name_or_path=family.tiny_names[0],
        precision=precision,
        quantization=quantization,
        peft=PeftSettings(targets=targets, dropout=dropout),
    )
    meta, planned_family = plan_lib.meta_model(cfg)
    spec = planned_family.plan_spec(meta)
    width, height = spec.geometry(cfg).image_size  # the image the planner sizes the sequence for
    model, processor = build_model(cfg, verbose=False)
    model.train()
    b = 3
    # Captions of different lengths: padded batches, as training sees them (an attention mask).
    batch = family.collator(processor, cfg, 48)(
        [(Image.new("RGB", (width, height), (40 * i, 90, 90)), "lung " * (30 - 9 * i)) for i in range(b)]
    )
    labels = batch.pop("labels")
    s = batch["input_ids"].shape[1]
    # The planner's prefix is the processor's: the first label follows it.
    assert int((labels[0] != -100).nonzero()[0]) == spec.prefix_tokens(cfg)
    measured = _saved_bytes(model, batch, autocast=mp == "bf16")
    trainable = trainable_parameters(meta, cfg, planned_family)
    predicted, _ = spec.activation_bytes(trainable, cfg, act_dtypes(cfg, mp, "cpu"), b, s, mp)
    assert predicted == pytest.approx(measured, rel=tolerance), (predicted, measured)


@pytest.mark.parametrize("family", [f for f in FAMILIES if isinstance(f, VlmFamily)], ids=lambda f: f.name)
def test_every_tiny_model_plans(family):
    cfg = RunConfig(
        model=ModelConfig(name_or_path=family.tiny_names[0], peft=PeftSettings(targets="lm-attn")),
        train=TrainConfig(batch_size=4, max_caption_tokens=32),
    )
    p = plan_lib.plan(cfg, "a100-80")
    assert p.fits and p.max_batch_size > 4 and p.epoch_seconds > 0
    spec = family.plan_spec(plan_lib.meta_model(cfg.model)[0])
    assert p.seq_len_max == spec.prefix_tokens(cfg.model) + 32 + spec.end_tokens(cfg.model)


def test_recorded_full_size_peaks_of_the_families_within_15_percent():
    """The planner (--gpu cpu) against peak RSS measured with the full-size random-weight models of
    the families' shipped configs on this CPU (benchmarks/bench_fullsize_families_cpu.py)."""
    from medcap.plan.recorded import RECORDED_FAMILY_PEAKS, recorded_run_config

    if not RECORDED_FAMILY_PEAKS:
        pytest.fail("no recorded family peaks in medcap.plan.recorded.RECORDED_FAMILY_PEAKS")
    families = set()
    for rec in RECORDED_FAMILY_PEAKS:
        cfg = recorded_run_config(rec)
        families.add(plan_lib.meta_model(cfg.model)[1].name)
        planned = plan_lib.plan(cfg, "cpu").memory.total
        assert planned == pytest.approx(rec["peak_rss_bytes"], rel=0.15), (rec["config"], planned, rec)
    # Every family with a shipped config of a model that fits this machine: Idefics3 (SmolVLM),
    # PaliGemma, InstructBLIP, Gemma 3 (MedGemma), Qwen3-VL, LLaVA-NeXT, and Qwen2.5-VL through its
    # 4-bit config (QLoRA).
    expected = {"idefics3", "paligemma", "instructblip", "gemma3", "qwen3-vl", "llava-next", "qwen2.5-vl"}
    assert families >= expected, families
