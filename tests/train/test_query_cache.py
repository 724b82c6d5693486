"""The frozen query-embedding cache: same losses as the normal path (fp16 tolerance), training and
captioning without the vision tower, refusals, the cache's identity checks, and fit() with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medcap.cli.train import cmd_features
from medcap.config.data import DataConfig
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.run import RunConfig
from medcap.config.train import TrainConfig
from medcap.data.images import read_image
from medcap.data.manifest import read_manifest
from medcap.model.build import build_model
from medcap.train import query_cache as features
from medcap.train.loss import label_token_count, token_loss_sum
from tests.fixtures import caption_collator, make_prepared, one_thread, tiny_overrides  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("data"), n_train=12, n_valid=4)


def _model(**kw):
    cfg = ModelConfig(name_or_path="tiny", peft=PeftSettings(targets="lm-qv", dropout=0.0), **kw)
    torch.manual_seed(0)
    model, processor = build_model(cfg, verbose=False)
    return cfg, model, processor


def _normal_loss(model, collator, rows):
    batch = collator([(read_image(r.image), r.caption) for r in rows])
    labels = batch.pop("labels")
    out = model(**batch)
    return token_loss_sum(out.logits, labels, True) / label_token_count(labels, True)


def _cached_loss(model, ds, idx):
    batch = ds.collate([ds[i] for i in idx])
    out = features.forward_from_cache(model, batch)
    return token_loss_sum(out.logits, batch["labels"], True) / label_token_count(batch["labels"], True)


def test_cached_loss_equals_normal_loss_and_trains_without_vision(prepared, tmp_path, one_thread):  # noqa: F811
    cfg, model, processor = _model()
    rows = read_manifest(prepared / "train" / "manifest.csv")
    index = features.cache_query_embeddings(
        model,
        processor,
        cfg,
        {"train": rows},
        tmp_path / "cache",
        batch_size=5,
        num_workers=0,
        progress=False,
    )
    info = index["splits"]["train"]
    nq, hq = model.config.num_query_tokens, model.config.qformer_config.hidden_size
    assert info["shape"] == [len(rows), nq, hq] and info["ids"] == [r.id for r in rows]
    stored = np.memmap(
        tmp_path / "cache" / "train.f16", dtype=np.float16, mode="r", shape=tuple(info["shape"])
    )
    with torch.no_grad():
        ref = features.query_outputs(
            model,
            processor.image_processor(images=[read_image(rows[3].image)], return_tensors="pt")[
                "pixel_values"
            ],
        )
    np.testing.assert_allclose(stored[3], ref[0].numpy(), rtol=2e-3, atol=2e-3)

    collator = caption_collator(processor, cfg, max_length=64)
    ds = features.CachedQueryDataset(tmp_path / "cache", rows, collator)
    model.eval()  # the cache is computed in eval mode (no Q-Former dropout): compare like with like
    with torch.no_grad():
        for idx in ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]):
            normal = _normal_loss(model, collator, [rows[i] for i in idx])
            cached = _cached_loss(model, ds, idx)
            assert float(cached) == pytest.approx(float(normal), rel=1e-3, abs=1e-4)

    # The same text tensors as the image path: labels, masks and lengths.
    normal_batch = collator([(read_image(rows[i].image), rows[i].caption) for i in (0, 1)])
    cached_batch = ds.collate([ds[0], ds[1]])
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(normal_batch[k], cached_batch[k])

    # The gradients of the adapters agree too (fp16 storage of the queries is the only difference).
    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    g_normal = grads(lambda: _normal_loss(model, collator, rows[:6]))
    g_cached = grads(lambda: _cached_loss(model, ds, range(6)))
    # Compared in norm: elementwise, a few near-zero entries differ by more than 1% of themselves
    # (measured 5.6e-4 in norm with the tiny model's 16 px patches and sine-cosine positions).
    rel = float((g_cached - g_normal).norm() / g_normal.norm())
    assert rel < 1e-2, rel

    # Greedy captions from the cache = generate() through the vision tower.
    images = [read_image(r.image) for r in rows[:3]]
    from medcap.model.families import BLIP2_OPT

    enc = BLIP2_OPT.generation_inputs(processor, images, "")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=1)
    expected = BLIP2_OPT.decode(processor, out, enc["input_ids"].shape[1])
    q = torch.stack([ds[i][0] for i in range(3)])
    # Freed vision side: training and captioning go on from the cache alone.
    freed = features.strip_vision(model)
    assert freed > 0 and not any(
        n.startswith(("vision_model.", "qformer.")) for n, _ in model.base_model.model.named_parameters()
    )
    assert (
        features.caption_from_cache(model, processor, q, max_new_tokens=6, do_sample=False, num_beams=1)
        == expected
    )
    model.train()
    loss = _cached_loss(model, ds, range(4))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(features.FeatureCacheError, match="removed"):
        model(**normal_batch)


def test_cache_belongs_to_its_weights(prepared, tmp_path, one_thread):  # noqa: F811
    cfg, model, processor = _model()
    rows = read_manifest(prepared / "valid" / "manifest.csv")
    features.cache_query_embeddings(
        model, processor, cfg, {"valid": rows}, tmp_path / "c", num_workers=0, progress=False
    )
    other_cfg, other, other_proc = _model(init_seed=7)
    # Another init seed is another vision tower: writing into the same folder is refused ...
    with pytest.raises(features.FeatureCacheError, match="other weights or settings"):
        features.cache_query_embeddings(
            other, other_proc, other_cfg, {"valid": rows}, tmp_path / "c", num_workers=0, progress=False
        )
    # ... and so is training it from the first model's cache.
    ds = features.CachedQueryDataset(
        tmp_path / "c", rows, caption_collator(other_proc, other_cfg, max_length=64)
    )
    with pytest.raises(features.FeatureCacheError, match="other vision weights"):
        features.forward_from_cache(other, ds.collate([ds[0]]))
    # Rows the cache does not hold are named.
    train_rows = read_manifest(prepared / "train" / "manifest.csv")
    with pytest.raises(
        features.FeatureCacheError, match=r"12 of 12 images have no cached embedding.*medcap features"
    ):
        features.CachedQueryDataset(
            tmp_path / "c", train_rows, caption_collator(processor, cfg, max_length=64)
        )
    with pytest.raises(features.FeatureCacheError, match="not a query cache"):
        features.CachedQueryDataset(
            tmp_path / "nothing", rows, caption_collator(processor, cfg, max_length=64)
        )


class _Augmenting:
    augment = "random-resized-crop"


@pytest.mark.parametrize(
    ("kwargs", "extra", "reason"),
    [
        ({"train_qformer": True}, None, "train_qformer trains the Q-Former"),
        ({"train_vision": True}, None, "train_vision trains the vision tower"),
        ({"full_finetune": True, "peft": PeftSettings(method="none")}, None, "full_finetune"),
        ({"peft": PeftSettings(targets="lm-qv+qformer-qv")}, None, "adapters on the Q-Former"),
        ({}, _Augmenting(), "augments images"),
    ],
)
def test_refuses_configs_whose_vision_side_changes(kwargs, extra, reason):
    cfg = ModelConfig(name_or_path="tiny", **kwargs)
    with pytest.raises(features.FeatureCacheError, match=reason):
        features.check_cacheable(cfg, data_cfg=extra)


def test_refuses_target_names_that_reach_the_vision_tower():
    cfg = ModelConfig(name_or_path="tiny", peft=PeftSettings(targets=["fc1", "fc2"]))
    lora_modules = ["vision_model.encoder.layers.0.mlp.fc1", "language_model.model.decoder.layers.0.fc1"]
    reason = features.cache_refusal(cfg, lora_modules=lora_modules)
    assert reason and "reach the vision side (vision_model.encoder.layers.0.mlp.fc1" in reason
    assert features.cache_refusal(ModelConfig(name_or_path="tiny", train_language_projection=True)) is None


def test_cli_builds_cache_and_refuses(prepared, tmp_path, capsys, one_thread):  # noqa: F811
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        f"data:\n  prepared: {prepared}\n  num_workers: 0\nmodel:\n  name_or_path: tiny\n  peft:\n    targets: lm-qv\n",
        encoding="utf-8",
    )
    out = tmp_path / "cache"
    assert cmd_features(["--config", str(cfg_path), "--out", str(out), "--num-workers", "0"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["splits"]) == ["train", "valid"] and "cached 16 images" in capsys.readouterr().out
    code = cmd_features(
        ["--config", str(cfg_path), "--out", str(tmp_path / "x"), "--model.train_qformer", "true"]
    )
    assert code == 2 and "train_qformer trains the Q-Former" in capsys.readouterr().err


def test_fit_trains_from_the_cache(prepared, tmp_path, one_thread):  # noqa: F811
    """fit() with train.query_cache: the run completes and learns (loss goes down) from the cache."""
    from medcap.config.loader import load_config
    from medcap.train.recipe import fit

    cfg = load_config(RunConfig, None, tiny_overrides(prepared, tmp_path / "run", **{"train.epochs": 3}))
    cfg.model.peft.targets = "lm-qv"
    model, processor = build_model(cfg.model, verbose=False)
    rows = {s: read_manifest(cfg.data.manifest(s)) for s in ("train", "valid")}
    features.cache_query_embeddings(
        model, processor, cfg.model, rows, tmp_path / "cache", num_workers=0, progress=False
    )
    cfg.train.query_cache = tmp_path / "cache"
    result = fit(cfg)
    assert result["step"] > 0 and np.isfinite(result["last_valid_loss"])
    import csv

    with (tmp_path / "run" / "log.csv").open() as f:
        train_losses = [float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train" and r["loss"]]
    assert train_losses[-1] < train_losses[0]


def test_dataclass_defaults_are_cacheable():
    """The original project's setting (LoRA q,v on the language model) is what the cache is for."""
    assert features.cache_refusal(RunConfig().model, DataConfig(), TrainConfig()) is None
