"""Training speed and memory of one shipped config of each image-text-to-text family on a GPU, with a
naive notebook-style baseline of the same family in the same run.

NOT RUN ON A GPU YET: no GPU was lent to the session that wrote it. Its CPU path runs in the tests
(``tests/benchmarks/test_gpu_bench_families.py``: ``--device cpu --tiny``, every family's tiny model).
On a lent H100/H200 set it up as ``benchmarks/gpu_bench.py`` says (carry ``.gpucheck`` with the repo
and the wheels), then::

    python3 benchmarks/gpu_bench_families.py --out $OUT [--steps 6] [--only qwen3-vl-4b-lora,...]

Per config, on random weights of the real architecture (``random_init``: the shipped config.json):

1. the card's measured bf16 matmul rate (``gpu_bench.matmul_tflops``), the denominator of MFU;
2. ours: the config's model (bf16 LoRA; the QLoRA config in 4-bit), the family's collator (labels on
   caption + end tokens only, image tokens never cut), captions at ROCOv2 lengths (the real
   valid-caption histogram) bucketed by length, images at the planner's planning size: samples/s,
   MFU = the planner's model FLOPs per sample x samples/s / the measured rate, peak allocated memory
   against ``medcap plan``'s total for the same micro-batch;
3. naive (what the common fine-tuning notebooks do): the whole conversation, answer included, through
   the processor padded to the batch's longest, ``labels = input_ids`` (prompt, image tokens and pads
   in the loss), random batch order; the same model, samples/s and peak memory.

Writes ``OUT/gpu_bench_families.json``. The ratio ours / naive is a comparison of two recipes on the
same model, precision and micro-batch (labelled as such in the output).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

#: One shipped config per family.
CONFIGS = (
    "qwen2.5-vl-7b-qlora-t4",
    "qwen3-vl-4b-lora",
    "llava-1.6-mistral-7b-lora",
    "paligemma2-3b-lora",
    "medgemma-4b-lora",
    "smolvlm-2b-lora",
    "instructblip-vicuna-7b-lora",
)


def run_config(name: str, device: str, tiny: bool, steps: int, batch: int, rate: float) -> dict:
    """Ours and the naive baseline for one shipped config."""
    import dataclasses

    import torch
    from gpu_bench import caption_of_tokens, sample_lengths
    from PIL import Image

    from medcap import plan as plan_lib
    from medcap.config.run import load_run_config
    from medcap.model.build import build_model
    from medcap.model.families import resolve_family
    from medcap.train.loss import batch_loss, label_token_count

    cfg = load_run_config(name)
    family = resolve_family(cfg.model)
    model_cfg = dataclasses.replace(
        cfg.model,
        name_or_path=family.tiny_names[0] if tiny else cfg.model.name_or_path,
        random_init=not tiny,
    )
    if device == "cpu" and model_cfg.precision == "fp16":
        model_cfg = dataclasses.replace(model_cfg, precision="bf16", compute_dtype="bf16")
    run_cfg = dataclasses.replace(
        cfg, model=model_cfg, train=dataclasses.replace(cfg.train, batch_size=batch, max_caption_tokens=96)
    )
    planned = plan_lib.plan(run_cfg, "h100" if device == "cuda" else "cpu", config_name=name)
    meta, _ = plan_lib.meta_model(model_cfg)
    spec = family.plan_spec(meta)
    width, height = spec.geometry(model_cfg).image_size
    del meta
    model, processor = build_model(model_cfg, verbose=True)
    if not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    tok = processor.tokenizer
    lengths = sample_lengths(steps * batch, seed=0)
    images = [Image.new("RGB", (width, height), (40 + 10 * i % 200, 60, 80)) for i in range(batch)]
    results = {
        "config": name,
        "family": family.name,
        "model": model_cfg.name_or_path,
        "batch": batch,
        "image": [width, height],
        "planner_gib": planned.memory.total / 2**30,
        "model_tflop_per_sample": planned.model_flops_per_sample / 1e12,
    }
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    def timed(make_batch, order: list[list[int]], label: str) -> dict:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        samples, t_total = 0, 0.0
        for k, idx in enumerate(order):
            batch_ = {key: v.to(device) for key, v in make_batch(idx).items()}
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss = batch_loss(model, batch_, family.decoder_only, None)
            (loss / label_token_count(batch_["labels"], family.decoder_only).clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if k:  # the first step pays one-off set-up
                t_total += time.perf_counter() - t0
                samples += len(idx)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return {"loop": label, "samples_per_s": samples / max(t_total, 1e-9), "peak_gib": peak}

    # Ours: the family's collator; batches sorted by caption length inside the run (bucketing).
    collator = family.collator(processor, model_cfg, 96)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ours_batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    ours = timed(
        lambda idx: collator(
            [(images[j % batch], caption_of_tokens(tok, lengths[i])) for j, i in enumerate(idx)]
        ),
        ours_batches,
        "ours",
    )
    ours["mfu"] = results["model_tflop_per_sample"] * ours["samples_per_s"] / rate if rate else float("nan")
    # Naive: the conversation with its answer through the processor, labels = input_ids.
    layout = family.layout(processor, model_cfg.prompt)
    rng = random.Random(0)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    naive_batches = [shuffled[i : i + batch] for i in range(0, len(shuffled), batch)]

    def naive_batch(idx: list[int]) -> dict:
        texts = [layout.text + layout.caption_prefix + caption_of_tokens(tok, lengths[i]) for i in idx]
        enc = processor(
            images=layout.images_arg(images[: len(idx)]),
            text=texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=layout.add_special_tokens,
        )
        enc = {k: v for k, v in enc.items() if k not in layout.drop}
        enc["labels"] = enc["input_ids"].clone()
        return enc

    naive = timed(naive_batch, naive_batches, "naive") if family.decoder_only else None
    results["ours"] = ours
    results["naive"] = naive
    if naive:
        results["ours_over_naive_samples_per_s"] = ours["samples_per_s"] / max(naive["samples_per_s"], 1e-9)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="each family's tiny model instead (the CPU test)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--only", help="comma-separated config names")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from gpu_bench import matmul_tflops

    from medcap.model.build import import_backends

    import_backends()
    rate = matmul_tflops(args.device)
    print(f"bf16 matmul: {rate:.1f} TFLOP/s measured on {args.device}")
    names = args.only.split(",") if args.only else list(CONFIGS)
    results, failed = [], []
    for name in names:
        try:
            r = run_config(name, args.device, args.tiny, args.steps, args.batch_size, rate)
        except Exception:  # noqa: BLE001 - one config's failure must not lose the others
            failed.append({"config": name, "error": traceback.format_exc()})
            print(failed[-1]["error"], file=sys.stderr)
            continue
        gc.collect()  # the config's model, before the next one is built
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        results.append(r)
        naive = r["naive"]
        print(
            f"{name}: ours {r['ours']['samples_per_s']:.2f} samples/s (MFU {100 * r['ours']['mfu']:.1f}%, peak "
            f"{r['ours']['peak_gib']:.2f} GiB, planner {r['planner_gib']:.2f} GiB)"
            + (
                f"; naive {naive['samples_per_s']:.2f} samples/s: ours/naive x{r['ours_over_naive_samples_per_s']:.2f} "
                "(a comparison of two recipes on the same model)"
                if naive
                else ""
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench_families.json").write_text(
        json.dumps(
            {"device": args.device, "bf16_tflops": rate, "results": results, "failed": failed}, indent=1
        ),
        encoding="utf-8",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
