"""The memory planner: parameter counts against FACTS 4, the activation formulas against what autograd
really saves (scaled-down models, counted with saved_tensors_hooks), and the totals against peaks
measured with the full-size random-weight models on this CPU (recorded in medcap.plan)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medcap import plan as plan_lib
from medcap.data import MANIFEST_COLUMNS, DataConfig
from medcap.model import ModelConfig, PeftSettings

REPO = Path(__file__).resolve().parents[1]
CONFIG_67 = REPO / "medcap" / "model_configs" / "blip2-opt-6.7b" / "config.json"


def _small_config(tmp_path: Path) -> Path:
    """A scaled-down BLIP2-OPT config (same structure, narrow layers) in a local folder."""
    d = json.loads(CONFIG_67.read_text())
    d["vision_config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56
    )
    d["qformer_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=64,
    )
    d["text_config"].update(
        hidden_size=128, word_embed_proj_dim=128, ffn_dim=512, num_hidden_layers=3, num_attention_heads=4
    )
    d["text_config"]["vocab_size"] = 1344
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def _manifest(tmp_path: Path, captions: list[str]) -> DataConfig:
    prepared = tmp_path / "prepared"
    (prepared / "train").mkdir(parents=True)
    with (prepared / "train" / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        for i, c in enumerate(captions):
            w.writerow(
                {
                    "id": f"x{i}",
                    "image": "/nonexistent.jpg",
                    "caption_raw": c,
                    "caption": c,
                    "cuis": "",
                    "modality": "ct",
                    "width": 10,
                    "height": 10,
                    "mode": "RGB",
                    "true_color": 0,
                }
            )
    return DataConfig(prepared=prepared)


def _saved_bytes(model, batch, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps from one forward (parameters excluded, storages counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(**batch)
    return sum(seen.values())


REGIMES = {
    # name: (precision, quantization, mixed precision, targets, lora dropout)
    "bf16-lora-qv": ("bf16", "none", "no", "lm-qv", 0.05),
    "bf16-lora-all-nodrop": ("bf16", "none", "no", "lm-all", 0.0),
    "fp32-autocast-bf16": ("fp32", "none", "bf16", "lm-qv", 0.05),
    "fp32-lora-attn": ("fp32", "none", "no", "lm-attn", 0.1),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_activation_formula_matches_saved_tensors(tmp_path, regime):
    from PIL import Image

    from medcap.model import CaptionCollator, build_model

    precision, quant, mp, targets, drop = REGIMES[regime]
    folder = _small_config(tmp_path)
    cfg = ModelConfig(
        name_or_path=str(folder),
        random_init=True,
        precision=precision,
        quantization=quant,
        peft=PeftSettings(targets=targets, dropout=drop),
    )
    model, processor = build_model(cfg, verbose=False)
    model.train()
    b, cap = 3, 40
    collator = CaptionCollator(processor, cfg, max_length=33 + cap + 1)
    batch = collator([(Image.new("RGB", (64, 64)), "lung " * 80)] * b)
    batch.pop("labels")
    s = batch["input_ids"].shape[1]
    assert s == 33 + cap + 1
    if precision != "fp32" or mp == "no":
        batch["pixel_values"] = batch["pixel_values"].to(
            model.dtype if precision != "fp32" else torch.float32
        )
    measured = _saved_bytes(model, batch, autocast=mp == "bf16")

    meta, family = plan_lib.meta_model(cfg)
    dims = plan_lib._dims(meta, family)
    trainable = plan_lib.trainable_parameters(meta, cfg, family)
    e = plan_lib.act_dtypes(cfg, mp, "cpu")
    predicted, _ = plan_lib.activation_bytes(dims, trainable, cfg, e, b, s, mp)
    assert predicted == pytest.approx(measured, rel=0.03), (regime, predicted, measured)
