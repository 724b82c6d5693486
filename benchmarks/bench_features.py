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
first and the later epochs, in wall time and in this process's CPU time (which other jobs on a
shared machine do not inflate; with ``--threads 1`` it is the work done).
"""

from __future__ import annotations

import argparse
import json
import os
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

        def epoch(e: int, cached_ds=None) -> tuple[float, float]:
            """(wall seconds, CPU seconds of this process) of one epoch."""
            model.train()
            t0, c0 = time.perf_counter(), time.process_time()
            for idx in epoch_batches(lengths, args.batch_size, args.seed, e, bucket=True):
                if cached_ds is None:
                    step(collator([train_ds[i] for i in idx]))
                else:
                    step(cached_ds.collate([cached_ds[i] for i in idx]))
            return time.perf_counter() - t0, time.process_time() - c0

        normal = [epoch(e) for e in range(2)]
        print(f"normal epochs: {', '.join(f'{w:.1f} s ({c:.1f} s CPU)' for w, c in normal)}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
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
        cache = (time.perf_counter() - t0, time.process_time() - c0)
        freed = features.strip_vision(model)
        ds = features.CachedQueryDataset(tmp / "cache", rows, collator)
        cached = [epoch(e, ds) for e in range(args.epochs)]
        print(
            f"cache built in {cache[0]:.1f} s ({cache[1]:.1f} s CPU); cached epochs: "
            f"{', '.join(f'{w:.1f} s ({c:.1f} s CPU)' for w, c in cached)}",
            flush=True,
        )

    def speedups(k: int) -> tuple[float, float, float, float]:
        """(steady normal epoch, steady cached epoch, first-epoch and later speed-up) in wall (k=0) or
        CPU (k=1) seconds. The first normal epoch carries one-off warm-up: the steady one is compared."""
        steady_normal = sum(t[k] for t in normal[1:]) / len(normal[1:])
        later_cached = [t[k] for t in cached[1:]] or [cached[0][k]]
        steady_cached = sum(later_cached) / len(later_cached)
        return (
            steady_normal,
            steady_cached,
            steady_normal / (cache[k] + cached[0][k]),
            steady_normal / steady_cached,
        )

    wall, cpu = speedups(0), speedups(1)
    result = {
        "machine": machine_description(),
        "load_average_at_end": os.getloadavg(),
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "captions": source,
        "normal_path": f"fit()'s: CaptionDataset with read_image(min_size={image_side}) (JPEG draft mode)",
        "normal_epoch_s": [w for w, _ in normal],
        "normal_epoch_cpu_s": [c for _, c in normal],
        "cache_build_s": cache[0],
        "cache_build_cpu_s": cache[1],
        "cached_epoch_s": [w for w, _ in cached],
        "cached_epoch_cpu_s": [c for _, c in cached],
        "vision_side_freed_bytes": freed,
        "speedup_first_epoch": wall[2],
        "speedup_later_epochs": wall[3],
        "speedup_first_epoch_cpu_time": cpu[2],
        "speedup_later_epochs_cpu_time": cpu[3],
    }
    print(
        f"\nper epoch of {args.images} images: normal {wall[0]:.1f} s ({cpu[0]:.1f} s CPU); cached {wall[1]:.1f} s "
        f"({cpu[1]:.1f} s CPU), +{cache[0]:.1f} s once to build the cache; vision side freed: {freed / 1e6:.0f} MB\n"
        f"speed-up, wall time: first epoch {wall[2]:.2f}x, later epochs {wall[3]:.2f}x\n"
        f"speed-up, CPU time (what other jobs on a shared machine do not inflate): first epoch {cpu[2]:.2f}x, "
        f"later epochs {cpu[3]:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
