"""Batched captioning throughput against one image at a time, same model, same run.

    .venv/bin/python benchmarks/bench_caption.py                       # tiny BLIP-2 (seconds, any CPU)
    .venv/bin/python benchmarks/bench_caption.py --images 64 --batch-size 16
    flock /tmp/medcap-fullsize.lock .venv/bin/python benchmarks/bench_caption.py \\
        --model Salesforce/blip2-opt-2.7b --precision bf16 --images 8 --batch-size 8 --max-new-tokens 10

Both loops call ``medcap.infer.generate.caption_images`` on the same pre-decoded images (ROCOv2-like
sizes, so the processor's resize is part of the work) with greedy decoding and a fixed caption length
(``min_new_tokens == max_new_tokens``): random weights would otherwise stop at different points and
the loops would do different amounts of work. Prints images per second for each, the ratio, and
whether the batched captions equal the one-at-a-time ones (they must, for greedy decoding).

``--model`` takes ``tiny``/``tiny-t5`` or a shipped full-size architecture, built with random weights
(``random_init``; nothing is downloaded): ``Salesforce/blip2-opt-2.7b`` (3.74B parameters: about
7.5 GB in bf16, some 8-9 GB peak resident), ``Salesforce/blip2-opt-6.7b`` (7.75B: about 15.5 GB
bf16, some 17 GB peak), ``Salesforce/blip2-flan-t5-xl``. On a shared CPU box run full-size models only
under ``flock /tmp/medcap-fullsize.lock`` and with few images; on a GPU pass ``--device cuda``.

Measured on the shared 2-core CPU box (load average about 10), tiny model, 32 images, 20 tokens,
batch 8: with ``--threads 1`` one at a time 2.77 images/s, batched 11.2 images/s (4.05x); with
torch's default 2 threads 0.37 vs 0.93 images/s (2.53x): on a busy box one thread is faster.
Captions were identical (32 of 32) both times.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medcap.config.generate import GenerateConfig
from medcap.config.model import ModelConfig, PeftSettings
from medcap.infer.generate import caption_images
from medcap.model.build import build_model
from medcap.model.families import FAMILIES


def make_images(n: int, seed: int) -> list[Image.Image]:
    """Radiograph-like grey images stored as RGB, 500-1000 px a side (ROCOv2 sizes)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = (int(x) for x in rng.integers(500, 1001, 2))
        y, x = np.mgrid[0:h, 0:w]
        blob = np.exp(-(((x - w * rng.random()) / (w / 4)) ** 2 + ((y - h * rng.random()) / (h / 4)) ** 2))
        grey = np.clip(40 + 180 * blob + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(np.stack([grey] * 3, axis=-1)))
    return images


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn) -> tuple[float, list[str]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="tiny", help="tiny, tiny-t5, or a shipped hub id built with random weights"
    )
    p.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp32 tiny, bf16 else"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--images", type=int, default=32, help="images captioned by each loop")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens per caption (fixed length)")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy; >1 beam search")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = any(args.model in f.tiny_names for f in FAMILIES)
    precision = args.precision or ("fp32" if tiny else "bf16")

    t0 = time.perf_counter()
    cfg = ModelConfig(
        name_or_path=args.model,
        random_init=not tiny,
        precision=precision,
        peft=PeftSettings(method="none"),
        init_seed=args.seed,
    )
    model, processor = build_model(cfg, verbose=True)
    if tiny:
        # The tiny model's default init (std 0.02) says the same thing for every image; larger
        # weights make the captions depend on the image, so the equality check means something.
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if prm.dim() >= 2 or "query_tokens" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    model.to(device)
    build_s = time.perf_counter() - t0
    images = make_images(args.images, args.seed)
    print(
        f"model {args.model} ({precision}) on {device}, built in {build_s:.1f} s; {len(images)} images "
        f"500-1000 px; greedy{'' if args.num_beams == 1 else f' beams={args.num_beams}'}, "
        f"{args.max_new_tokens} new tokens each; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    fixed = {"min_new_tokens": args.max_new_tokens, "max_new_tokens": args.max_new_tokens}
    one_cfg = GenerateConfig(batch_size=1, num_beams=args.num_beams, **fixed)
    batch_cfg = GenerateConfig(batch_size=args.batch_size, num_beams=args.num_beams, **fixed)
    # Warm-up: first calls pay for lazy imports, allocator growth and kernel selection.
    caption_images(model, processor, images[:2], GenerateConfig(batch_size=2, max_new_tokens=2))

    one_s, one = timed(lambda: [caption_images(model, processor, [im], one_cfg)[0] for im in images])
    batch_s, batched = timed(lambda: caption_images(model, processor, images, batch_cfg))
    one_rate, batch_rate = len(images) / one_s, len(images) / batch_s
    same = sum(a == b for a, b in zip(one, batched, strict=True))
    print(f"one at a time : {one_rate:8.2f} images/s  ({one_s:.2f} s)")
    print(f"batch {args.batch_size:<7} : {batch_rate:8.2f} images/s  ({batch_s:.2f} s)")
    print(f"ratio batched / one at a time: {batch_rate / one_rate:.2f}x")
    print(f"batched captions equal to one-at-a-time: {same} of {len(images)}")
    print(f"distinct captions: {len(set(batched))} of {len(images)}; peak RSS {peak_rss_gb():.2f} GB")
    if device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "precision": precision,
                    "device": device,
                    "images": len(images),
                    "batch_size": args.batch_size,
                    "max_new_tokens": args.max_new_tokens,
                    "num_beams": args.num_beams,
                    "one_at_a_time_images_per_s": one_rate,
                    "batched_images_per_s": batch_rate,
                    "ratio": batch_rate / one_rate,
                    "equal_captions": same,
                    "peak_rss_gb": peak_rss_gb(),
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if same == len(images) or args.num_beams > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
