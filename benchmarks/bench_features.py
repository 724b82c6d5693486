"""Per-epoch speed-up of training from cached query embeddings (``medcap features``), on this CPU.

    .venv/bin/python benchmarks/bench_features.py [--images 24] [--batch-size 4] [--epochs 2]

A mid-sized random BLIP2-OPT (the real structure at a quarter of the width and a sixth of the depth:
ViT 352 wide x 6 layers, Q-Former 192 x 4, OPT 1024 x 6 with the real 50k vocabulary; fp32 because
this CPU has no native bf16), LoRA q,v r=16, phantom JPEGs (ROCOv2-like sizes) with captions at real
ROCOv2 lengths. Both loops see the same length-bucketed batches:

* normal: what ``fit()`` does per batch: ``train.batches.CaptionDataset`` decodes each JPEG with
  ``data.images.read_image(min_size=...)`` at the model's input side (Pillow's draft mode, as
  ``fit()`` passes ``family.image_side(processor)``), the collator resizes and normalises, then the
  vision tower, Q-Former and LM train step;
* cached: epoch 1 = compute the Q-Former outputs once (``cache_query_embeddings``) + train from the
  cache; later epochs = train from the cache only (no decode, no vision tower: it is freed).

Both loops load in this process (``fit()`` with ``data.num_workers 0``), so the decoding the cached
path saves shows in its time. Prints seconds per epoch and the ratio (normal / cached) for the
first and the later epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchdata import machine_description, phantom_pairs

SCALED = {
    "vision_config": {
        "hidden_size": 352,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
    },
    "qformer_config": {
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "encoder_hidden_size": 352,
    },
    "text_config": {
        "hidden_size": 1024,
        "word_embed_proj_dim": 1024,
        "ffn_dim": 4096,
        "num_hidden_layers": 6,
        "num_attention_heads": 16,
    },
}


def write_config(folder: Path) -> Path:
    """The scaled-down BLIP2-OPT config.json (from the shipped 6.7B one)."""
    from medcap.model.tokenizer import ASSETS_DIR as MODEL_CONFIGS_DIR

    d = json.loads((MODEL_CONFIGS_DIR / "blip2-opt-6.7b" / "config.json").read_text())
    for section, values in SCALED.items():
        d[section].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(d), encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--epochs", type=int, default=2, help="epochs of the cached loop (>= 2 shows the steady state)"
    )
    p.add_argument("--cap", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.data.manifest import ManifestRow
    from medcap.model.build import build_model
    from medcap.train import query_cache as features
    from medcap.train.batches import CaptionDataset, epoch_batches
    from medcap.train.loss import label_token_count, token_loss_sum

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medcap-bench-features-") as tmp:
        tmp = Path(tmp)
        pairs, source = phantom_pairs(tmp / "ph", args.images, args.seed)
        rows = [ManifestRow(id=Path(i).stem, image=str(i), caption_raw=c, caption=c) for i, c in pairs]
        cfg = ModelConfig(
            name_or_path=str(write_config(tmp / "model")),
            random_init=True,
            precision="fp32",
            peft=PeftSettings(method="lora", r=16, dropout=0.05, targets="lm-qv"),
        )
        torch.manual_seed(args.seed)
        model, processor = build_model(cfg, verbose=True)
        collator = model.medcap_family.collator(processor, cfg, args.cap)
        # fit()'s own dataset and decode size (draft-mode JPEG decoding at the model's input side).
        image_side = model.medcap_family.image_side(processor)
        train_ds = CaptionDataset(rows, min_size=image_side)
        lengths = [
            len(x)
            for x in processor.tokenizer([r.caption for r in rows], add_special_tokens=False)["input_ids"]
        ]
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

        def step(batch):
            labels = batch.pop("labels")
            out = (
                features.forward_from_cache(model, {**batch, "labels": labels})
                if "query_embeds" in batch
                else model(**batch)
            )
            loss = token_loss_sum(out.logits, labels, True) / label_token_count(labels, True).clamp(min=1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def epoch(e: int, cached_ds=None) -> float:
            model.train()
            t0 = time.perf_counter()
            for idx in epoch_batches(lengths, args.batch_size, args.seed, e, bucket=True):
                if cached_ds is None:
                    step(collator([train_ds[i] for i in idx]))
                else:
                    step(cached_ds.collate([cached_ds[i] for i in idx]))
            return time.perf_counter() - t0

        normal = [epoch(e) for e in range(2)]
        print(f"normal epochs: {', '.join(f'{t:.1f} s' for t in normal)}", flush=True)
        t0 = time.perf_counter()
        features.cache_query_embeddings(
            model,
            processor,
            cfg,
            {"train": rows},
            tmp / "cache",
            batch_size=args.batch_size,
            num_workers=0,
            progress=False,
        )
        cache_s = time.perf_counter() - t0
        freed = features.strip_vision(model)
        ds = features.CachedQueryDataset(tmp / "cache", rows, collator)
        cached = [epoch(e, ds) for e in range(args.epochs)]
        print(
            f"cache built in {cache_s:.1f} s; cached epochs: {', '.join(f'{t:.1f} s' for t in cached)}",
            flush=True,
        )

    steady_normal = sum(normal[1:]) / len(normal[1:])
    steady_cached = sum(cached[1:]) / max(len(cached[1:]), 1) if len(cached) > 1 else cached[0]
    # The first normal epoch carries one-off warm-up costs: compare with the steady normal epoch.
    first = steady_normal / (cache_s + cached[0])
    later = steady_normal / steady_cached
    result = {
        "machine": machine_description(),
        "images": args.images,
        "batch_size": args.batch_size,
        "captions": source,
        "normal_path": f"fit()'s: CaptionDataset with read_image(min_size={image_side}) (JPEG draft mode)",
        "normal_epoch_s": normal,
        "cache_build_s": cache_s,
        "cached_epoch_s": cached,
        "vision_side_freed_bytes": freed,
        "speedup_first_epoch": first,
        "speedup_later_epochs": later,
    }
    print(
        f"\nper epoch of {args.images} images: normal {steady_normal:.1f} s; cached {steady_cached:.1f} s "
        f"(+{cache_s:.1f} s once to build the cache); vision side freed: {freed / 1e6:.0f} MB\n"
        f"speed-up: first epoch {first:.2f}x, later epochs {later:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
