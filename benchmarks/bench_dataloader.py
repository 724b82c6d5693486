"""Does the training data path keep up with the GPU? And how much padding does bucketing save?

    .venv/bin/python benchmarks/bench_dataloader.py [--images 96] [--workers 2] [--batch-size 8]

1. Images per second of the training data path: ``train.CaptionDataset`` with a full JPEG decode
   (``data.load_image`` without ``min_size``: the baseline) in DataLoader worker processes,
   ``CaptionCollator`` (the processor resizes to 224 and normalises; tokens, labels) over
   length-bucketed batches (``train.epoch_batches``), on phantom JPEGs of ROCOv2-like sizes (500-1000
   px a side). A second run decodes with ``data.read_image(path, min_size=224)``: Pillow's JPEG draft
   mode (the decoder scales by 1/2, 1/4 or 1/8 while decoding, to no less than the model's input
   size), which is what ``fit()`` does (``min_size=model.image_side(processor)``). Both are also timed
   in CPU time per image in one process (robust to a shared, loaded box).
2. What a GPU consumes. Estimated by the planner (``medcap.plan``, not a measurement): BLIP2-OPT-6.7B
   QLoRA (4-bit, fp16) on two T4s and bf16 LoRA on one A100-80, images per second = GPUs x peak x
   an assumed utilisation / FLOPs per sample; the loader must outrun both by 3x or more (the exit
   code). Measured, where a GPU run left its raw file in benchmarks/results/ (``gpu_bench.py``: the
   fastest bf16 LoRA case of our loop on that card): the same ratio, labelled with the card and
   the file.
3. Padding waste (pad tokens / all tokens of the padded batches the language model sees) on the REAL
   ROCOv2 validation captions (``../shared/data/rocov2-valid``), tokenised with the shipped offline
   BPE, with and without length bucketing.
4. The start of a pass (an epoch, or a validation): seconds to the first batch with a new DataLoader
   per pass (workers forked and warmed up again each time: the baseline) against one loader with
   persistent workers whose batches are replaced before each pass (what ``fit()`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchdata import SHARED_VALID_CAPTIONS, machine_description, phantom_pairs, real_captions

from medcap.data.images import read_image
from medcap.data.manifest import ManifestRow


class DraftDataset:
    """``train.CaptionDataset`` decoding with ``data.read_image(path, min_size=size)``: Pillow's JPEG
    draft mode (the largest 1/2-1/8 reduction that keeps both sides >= the model's input size),
    then the same mode conversions. What ``CaptionDataset`` does once it passes the model's size."""

    def __init__(self, rows: list[ManifestRow], size: int):
        self.rows = rows
        self.size = size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        return read_image(row.image, min_size=self.size), row.caption


def cpu_ms_per_image(rows: list[ManifestRow], collator, min_size: int | None, batch: int) -> float:
    """Single-process CPU time per image of decode + collate (the work one worker does), in ms."""
    t0 = time.process_time()
    for k in range(0, len(rows), batch):
        chunk = rows[k : k + batch]
        collator([(read_image(r.image, min_size=min_size), r.caption) for r in chunk])
    return 1e3 * (time.process_time() - t0) / len(rows)


def loader_rate(dataset, collator, batches, workers: int) -> tuple[float, float]:
    """(images/s over the timed batches, seconds of the first batch incl. worker start-up)."""
    from torch.utils.data import DataLoader

    dl = DataLoader(dataset, batch_sampler=batches, collate_fn=collator, num_workers=workers)
    t0 = time.perf_counter()
    it = iter(dl)
    first = next(it)
    t_first = time.perf_counter() - t0
    n = 0
    t1 = time.perf_counter()
    for batch in it:
        n += batch["pixel_values"].shape[0]
    dt = time.perf_counter() - t1
    del first
    return n / dt, t_first


def pass_start_seconds(dataset, collator, batches, workers: int, passes: int) -> tuple[float, float]:
    """Mean seconds from the start of a pass to its first batch: (new loader per pass, persistent).

    Each pass reads a few batches only: the start is what differs. The persistent loader's first
    pass (which starts the workers) is left out of its mean, as it is paid once per run."""
    from torch.utils.data import DataLoader

    from medcap.train.batches import PassBatches as _PassBatches

    head = batches[:3]

    def one_pass(dl) -> float:
        t0 = time.perf_counter()
        it = iter(dl)
        next(it)
        dt = time.perf_counter() - t0
        for _ in it:
            pass
        return dt

    fresh = [
        one_pass(DataLoader(dataset, batch_sampler=head, collate_fn=collator, num_workers=workers))
        for _ in range(passes)
    ]
    sampler = _PassBatches()
    dl = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers, persistent_workers=True
    )
    kept = []
    for _ in range(passes + 1):
        sampler.batches = head
        kept.append(one_pass(dl))
    del dl
    return sum(fresh) / passes, sum(kept[1:]) / passes


def gpu_consumption() -> list[dict]:
    """Images/s the planner expects a T4 pair (QLoRA) and an A100-80 (bf16 LoRA) to train at."""
    from medcap import plan as plan_lib
    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.config.run import RunConfig
    from medcap.config.train import TrainConfig

    lora = PeftSettings(method="lora", r=16, alpha=32, dropout=0.05, targets="lm-qv")
    cases = [
        (
            "t4",
            2,
            RunConfig(
                model=ModelConfig(
                    random_init=True,
                    precision="fp16",
                    quantization="4bit",
                    gradient_checkpointing=True,
                    peft=lora,
                ),
                train=TrainConfig(batch_size=8, mixed_precision="fp16"),
            ),
        ),
        (
            "a100-80",
            1,
            RunConfig(
                model=ModelConfig(random_init=True, precision="bf16", peft=lora),
                train=TrainConfig(batch_size=16, mixed_precision="bf16"),
            ),
        ),
    ]
    out = []
    for gpu, n, cfg in cases:
        p = plan_lib.plan(cfg, gpu, n)
        out.append(
            {
                "gpu": f"{n} x {gpu}",
                "setting": f"{cfg.model.quantization} {cfg.model.precision}, batch {cfg.train.batch_size}",
                "images_per_s": p.train_images / p.epoch_seconds,
                "utilisation": p.utilisation,
            }
        )
    return out


def measured_gpu_rates() -> list[dict]:
    """The fastest bf16 LoRA training rate of our loop (samples = images per second) in each
    gpu_bench result file of benchmarks/results/ run with fit()'s CUDA settings (measured on that
    card, BLIP2-OPT-6.7B)."""
    out = []
    for path in sorted((Path(__file__).resolve().parent / "results").glob("gpu_bench_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("info", {}).get("cudnn_sdpa") is not False:
            continue  # a run from before fit()'s attention settings (cuDNN's per-shape plans made it slow)
        ours = [
            r
            for r in data.get("results", [])
            if "error" not in r and r.get("weights") == "bf16" and r.get("loop") == "ours"
        ]
        if ours:
            best = max(ours, key=lambda r: r["samples_per_s"])
            out.append(
                {
                    "gpu": data.get("info", {}).get("device", "?"),
                    "setting": f"bf16 LoRA, batch {best['batch']}"
                    + (", checkpointing" if best["gradient_checkpointing"] else ""),
                    "images_per_s": best["samples_per_s"],
                    "source": f"measured: benchmarks/results/{path.name}",
                }
            )
    return out


def padding_waste(batch_size: int, cap: int, seed: int) -> dict:
    """Pad tokens / all tokens with and without bucketing on the real ROCOv2 valid captions."""
    from medcap.model.tokenizer import offline_tokenizer
    from medcap.train.batches import epoch_batches

    caps = real_captions()
    if not caps:
        return {"skipped": f"{SHARED_VALID_CAPTIONS} not found"}
    tok = offline_tokenizer("bos-first")
    prefix = 32 + 1  # image tokens + BOS (no prompt)
    lengths = [prefix + min(len(x), cap) + 1 for x in tok(caps, add_special_tokens=False)["input_ids"]]
    out = {"captions": len(caps), "batch_size": batch_size, "caption_cap": cap}
    for name, bucket in (("random batches", False), ("bucketed", True)):
        real = padded = 0
        for batch in epoch_batches(lengths, batch_size, seed, 0, bucket):
            width = max(lengths[i] for i in batch)
            real += sum(lengths[i] for i in batch)
            padded += width * len(batch)
        out[name] = (padded - real) / padded
    # Caption tokens only (the part that varies), for reference.
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cap", type=int, default=64, help="caption tokens kept (train.max_caption_tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    from medcap.config.model import ModelConfig
    from medcap.model.build import build_model
    from medcap.train.batches import CaptionDataset, epoch_batches

    torch.set_num_threads(1)
    results: dict = {"machine": machine_description(), "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="medcap-loader-") as tmp:
        pairs, source = phantom_pairs(Path(tmp) / "ph", args.images, args.seed)
        rows = [ManifestRow(id=Path(pth).stem, image=str(pth), caption_raw=c, caption=c) for pth, c in pairs]
        # The full-size models' processor resizes to 224 px with CLIP normalisation; the tiny model's
        # processor at image_size 224 is the same code with the same settings (and needs no hub).
        cfg = ModelConfig(name_or_path="tiny", image_size=224)
        model, processor = build_model(cfg, verbose=False)
        collator = model.medcap_family.collator(processor, cfg, args.cap)
        lengths = [
            len(x) for x in processor.tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
        ]
        batches = epoch_batches(lengths, args.batch_size, args.seed, 0, bucket=True)
        rate, first = loader_rate(CaptionDataset(rows), collator, batches, args.workers)
        rate_draft, _ = loader_rate(DraftDataset(rows, 224), collator, batches, args.workers)
        results.update(images=args.images, captions=source, images_per_s=rate, images_per_s_draft=rate_draft)
        results["first_batch_s"] = first
        fresh, kept = pass_start_seconds(DraftDataset(rows, 224), collator, batches, args.workers, 5)
        results.update(pass_start_s_new_loader=fresh, pass_start_s_persistent=kept)
        # CPU time per image (process time, so the other jobs on a shared box do not inflate it): what
        # `workers` free cores would deliver is workers x 1000 / ms.
        ms = cpu_ms_per_image(rows, collator, None, args.batch_size)
        ms_draft = cpu_ms_per_image(rows, collator, 224, args.batch_size)
        results.update(cpu_ms_per_image=ms, cpu_ms_per_image_draft=ms_draft)
    results["gpu"] = [{**g, "source": "planner estimate (not a measurement)"} for g in gpu_consumption()]
    results["gpu_measured"] = measured_gpu_rates()
    results["padding"] = padding_waste(args.batch_size, args.cap, args.seed)

    print(f"\ndata path, {args.workers} workers, batch {args.batch_size}, phantom JPEGs 500-1000 px -> 224:")
    print(f"  full decode + resize + normalise + collate (baseline):    {rate:8.1f} images/s")
    print(f"  with Pillow JPEG draft mode (what fit() does):            {rate_draft:8.1f} images/s")
    free = args.workers * 1e3 / ms
    free_draft = args.workers * 1e3 / ms_draft
    print(
        f"  CPU time per image, one process: {ms:.1f} ms full decode, {ms_draft:.1f} ms draft mode "
        f"({ms / ms_draft:.2f}x): {args.workers} free cores would give {free:.0f} / {free_draft:.0f} images/s"
    )
    ok = True
    print("  against what a GPU would consume, by the planner (an ESTIMATE at an assumed utilisation):")
    for g in results["gpu"]:
        # The verdict is for the path fit() runs (draft mode); the full decode is the baseline.
        margin = rate_draft / g["images_per_s"]
        ok &= margin >= 3
        print(
            f"    {g['gpu']:<12} {g['setting']:<22} {g['images_per_s']:7.1f} images/s planned "
            f"({100 * g['utilisation']:.0f}% utilisation): fit()'s loader {margin:5.1f}x the planner's estimate: "
            f"{'OK' if margin >= 3 else 'TOO SLOW (< 3x)'} (full decode {rate / g['images_per_s']:.1f}x; "
            f"on free cores: draft {free_draft / g['images_per_s']:.1f}x, full {free / g['images_per_s']:.1f}x)"
        )
    if results["gpu_measured"]:
        print("  against what a GPU consumed, MEASURED (gpu_bench raw files):")
    for g in results["gpu_measured"]:
        margin = rate_draft / g["images_per_s"]
        print(
            f"    {g['gpu']:<24} {g['setting']:<30} {g['images_per_s']:7.1f} images/s measured: fit()'s "
            f"loader ({args.workers} workers) {margin:5.1f}x; on free cores {free_draft / g['images_per_s']:.1f}x "
            f"({g['source']})"
        )
    print(
        f"  start of a pass (epoch or validation), to its first batch: new loader each pass {1e3 * fresh:.0f} ms, "
        f"persistent workers (fit()) {1e3 * kept:.0f} ms ({fresh / kept:.1f}x)"
    )
    pad = results["padding"]
    if "skipped" in pad:
        print(f"padding waste: skipped ({pad['skipped']})")
    else:
        print(
            f"padding waste on {pad['captions']} real ROCOv2 valid captions (batch {pad['batch_size']}, cap "
            f"{pad['caption_cap']} tokens): random batches {100 * pad['random batches']:.1f}%, bucketed "
            f"{100 * pad['bucketed']:.1f}%"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
