"""The memory planner: parameter counts against FACTS 4, the activation formulas against what autograd
really saves (scaled-down models, counted with saved_tensors_hooks), and the totals against peaks
measured with the full-size random-weight models on this CPU (recorded in medcap.plan)."""

from __future__ import annotations

import csv
import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medcap import plan as plan_lib
from medcap.cli.plan import cmd_plan
from medcap.config.data import DataConfig
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.run import RunConfig
from medcap.config.train import TrainConfig
from medcap.data.manifest import MANIFEST_COLUMNS
from medcap.plan.memory import act_dtypes, trainable_parameters

REPO = Path(__file__).resolve().parents[2]
CONFIG_67 = REPO / "medcap" / "model" / "assets" / "blip2-opt-6.7b" / "config.json"


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
    (prepared / "train").mkdir(parents=True, exist_ok=True)
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

    from medcap.model.build import build_model
    from tests.fixtures import caption_collator

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
    collator = caption_collator(processor, cfg, max_length=33 + cap + 1)
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
    trainable = trainable_parameters(meta, cfg, family)
    e = act_dtypes(cfg, mp, "cpu")
    predicted, _ = family.plan_spec(meta).activation_bytes(trainable, cfg, e, b, s, mp)
    assert predicted == pytest.approx(measured, rel=0.03), (regime, predicted, measured)


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors that operators create under this mode and that are still alive, and
    their peak: what a training step holds at its worst moment (forward, loss and backward on the
    CPU all dispatch through it). Storages shared with parameters (transposed weight views) and
    storages seen before are not counted twice; a storage counts until it is freed."""

    def __init__(self, model) -> None:
        super().__init__()
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self.params or key in self.live:
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key)
        return out


LOGIT_REGIMES = {
    # name: (precision, mixed precision)
    "bf16": ("bf16", "no"),
    "fp32": ("fp32", "no"),
    "fp32-autocast-bf16": ("fp32", "bf16"),
}


@pytest.mark.parametrize("regime", sorted(LOGIT_REGIMES))
def test_logits_and_loss_term_matches_the_step_peak(tmp_path, regime):
    """The planner's logits and loss term (the lm_head output, the fp32 log-probabilities the loss
    keeps, their gradient and the logits' gradient, all b x s x vocab) against the peak of the
    tensors a real training step holds (forward, ``token_loss_sum``, backward), at the real 50k
    vocabulary on narrow layers and a batch where the logits are most of the step's memory: a
    missing or wrong term fails here, as a wrong activation formula fails above."""
    from PIL import Image

    from medcap.model.build import build_model
    from medcap.train.loss import token_loss_sum
    from tests.fixtures import caption_collator

    precision, mp = LOGIT_REGIMES[regime]
    folder = _small_config(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = json.loads(CONFIG_67.read_text())["text_config"]["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig(
        name_or_path=str(folder),
        random_init=True,
        precision=precision,
        peft=PeftSettings(targets="lm-qv", dropout=0.05),
    )
    model, processor = build_model(cfg, verbose=False)
    model.train()
    b, cap = 4, 20
    batch = caption_collator(processor, cfg, max_length=33 + cap + 1)(
        [(Image.new("RGB", (64, 64)), "lung " * 80)] * b
    )
    labels = batch.pop("labels")
    s = batch["input_ids"].shape[1]
    if mp == "no":
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    mode = _LiveTensorBytes(model)
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mp == "bf16"):
            out = model(**batch)
        token_loss_sum(out.logits, labels, True).backward()
        del out
    measured = mode.peak

    meta, family = plan_lib.meta_model(cfg)
    trainable = trainable_parameters(meta, cfg, family)
    acts, logits = family.plan_spec(meta).activation_bytes(
        trainable, cfg, act_dtypes(cfg, mp, "cpu"), b, s, mp
    )
    assert logits > 0.75 * measured, (regime, logits, measured)  # the term matters at this batch
    assert acts + logits == pytest.approx(measured, rel=0.05), (regime, acts, logits, measured)


def _run_cfg(tmp_path: Path, **model_kw) -> RunConfig:
    data = _manifest(tmp_path, ["Axial CT of the chest showing a nodule in the right lower lobe."] * 4)
    train_kw = model_kw.pop("train", {})
    return RunConfig(
        data=data,
        model=ModelConfig(name_or_path="Salesforce/blip2-opt-6.7b", **model_kw),
        train=TrainConfig(**train_kw),
    )


@pytest.mark.parametrize(
    ("targets", "expected"),
    [("lm-qv", 8_388_608), ("lm-attn", 16_777_216), ("lm-all", 37_748_736), ("qformer-qv", 946_176)],
)
def test_trainable_counts_match_facts(tmp_path, targets, expected):
    """FACTS 4: q,v r=16 8.39M; q,k,v,out 16.8M; all six LM linears 37.8M; Q-Former query,value 0.95M."""
    cfg = _run_cfg(tmp_path, precision="bf16", peft=PeftSettings(targets=targets))
    p = plan_lib.plan(cfg, "a100-80")
    assert p.trainable_params == expected
    assert p.total_params == pytest.approx(7.75e9, rel=0.005)  # FACTS 3: about 7.75B in all


def test_6_7b_weights_by_precision_and_quantisation(tmp_path):
    """Weights against FACTS 4's estimates (fp16 15.5 GB, 8-bit ~8.3 GB, NF4 ~5.0 GB) plus what
    build_model really adds: the fp32 Q-Former, and with bitsandbytes the fp32 casts of
    prepare_model_for_kbit_training (the 50k x 4096 embedding alone is 0.82 GB in fp32)."""
    p16 = plan_lib.plan(_run_cfg(tmp_path, precision="fp16"), "a100-80")
    assert p16.memory.weights / 1e9 == pytest.approx(15.5 + 0.107 * 2, rel=0.02)
    assert p16.memory.weights_by_kind["fp32 (Q-Former, query tokens kept)"] == pytest.approx(
        107e6 * 4, rel=0.05
    )
    p8 = plan_lib.plan(_run_cfg(tmp_path, precision="fp16", quantization="8bit"), "a100-80")
    p4 = plan_lib.plan(_run_cfg(tmp_path, precision="fp16", quantization="4bit"), "t4")
    fp32_cast = p4.memory.weights_by_kind["fp32 (cast by prepare_model_for_kbit_training)"]
    assert 0.82e9 < fp32_cast < 1.0e9  # embeddings (0.82 GB), norms, biases, vision positions
    nf4 = p4.memory.weights_by_kind["nf4 + double-quant absmax"]
    assert nf4 / 1e9 == pytest.approx(7.64e9 * 0.5 * (1 + 2 / 64) / 1e9, rel=0.05)
    assert 4.5e9 < p4.memory.weights < 6.0e9
    assert 7.5e9 < p8.memory.weights < 9.5e9


def test_cli_t4_qlora_fits_and_bf16_warns(tmp_path, capsys):
    data = _manifest(tmp_path, ["Chest X-ray showing cardiomegaly."] * 3)
    yaml_path = tmp_path / "t4.yaml"
    yaml_path.write_text(
        f"data:\n  prepared: {data.prepared}\nmodel:\n  name_or_path: Salesforce/blip2-opt-6.7b\n  precision: fp16\n"
        "  quantization: 4bit\n  gradient_checkpointing: true\ntrain:\n  batch_size: 8\n  mixed_precision: fp16\n"
    )
    out_json = tmp_path / "plan.json"
    assert cmd_plan(["--config", str(yaml_path), "--gpu", "t4", "--gpus", "2", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "fits: YES" in text and "nf4 + double-quant absmax" in text and "epoch of 3 images" in text
    plan = json.loads(out_json.read_text())
    assert plan["memory"]["total"] < 15 * 1024**3 and plan["max_batch_size"] >= 8
    # bf16 on a T4 (no bf16 tensor cores) is flagged; a 6.7B bf16 LoRA does not fit 16 GB.
    assert (
        cmd_plan(
            [
                "--config",
                str(yaml_path),
                "--gpu",
                "t4",
                "--model.precision",
                "bf16",
                "--model.quantization",
                "none",
                "--train.mixed_precision",
                "bf16",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "fits: NO" in text and "no bf16 tensor cores" in text and "model.quantization 4bit" in text


def test_bad_gpu_and_batch_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cmd_plan(["--gpu", "k80"])
    assert "invalid choice: 'k80'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown GPU"):
        plan_lib.plan(_run_cfg(tmp_path), "k80")


def test_recorded_cpu_peaks_within_15_percent(tmp_path):
    """The planner's prediction for --gpu cpu against peak RSS measured on this machine with the
    full-size random-weight models (benchmarks/bench_fullsize_cpu.py --measure-peak)."""
    if not plan_lib.RECORDED_CPU_PEAKS:
        pytest.fail("no recorded CPU peaks in medcap.plan.RECORDED_CPU_PEAKS")
    for rec in plan_lib.RECORDED_CPU_PEAKS:
        assert rec["source"].startswith("measured"), (
            rec
        )  # measurements only, no figures quoted from elsewhere
        cfg = RunConfig(
            data=_manifest(tmp_path / rec["model"].replace("/", "_"), ["x"]),
            model=ModelConfig(
                name_or_path=rec["model"],
                precision="bf16",
                peft=PeftSettings(targets="lm-qv", r=16, dropout=0.05),
            ),
            train=TrainConfig(batch_size=rec["batch_size"], max_caption_tokens=rec["caption_cap"]),
        )
        p = plan_lib.plan(cfg, "cpu")
        assert p.memory.total == pytest.approx(rec["peak_rss_bytes"], rel=0.15), rec


def test_qformer_training_formula_is_within_12_percent(tmp_path):
    """The encoder-layer formula (trained Q-Former: every linear keeps its input) is coarser than the
    OPT one: within 12% of what autograd keeps (it measured -9% here)."""
    from PIL import Image

    from medcap.model.build import build_model
    from tests.fixtures import caption_collator

    folder = _small_config(tmp_path)
    cfg = ModelConfig(
        name_or_path=str(folder),
        random_init=True,
        precision="fp32",
        train_qformer=True,
        peft=PeftSettings(targets="lm-qv", dropout=0.05),
    )
    model, processor = build_model(cfg, verbose=False)
    model.train()
    batch = caption_collator(processor, cfg, max_length=74)([(Image.new("RGB", (64, 64)), "lung " * 80)] * 3)
    batch.pop("labels")
    measured = _saved_bytes(model, batch, autocast=False)
    meta, family = plan_lib.meta_model(cfg)
    trainable = trainable_parameters(meta, cfg, family)
    predicted, _ = family.plan_spec(meta).activation_bytes(
        trainable, cfg, act_dtypes(cfg, "no", "cpu"), 3, 74
    )
    assert predicted == pytest.approx(measured, rel=0.12)
