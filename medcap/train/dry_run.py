"""``medcap train --dry-run``: a user's real config for a few steps with random weights of the same
architecture, on phantom data or the first rows of their data."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from medcap.config.model import ModelConfig
from medcap.config.run import RunConfig
from medcap.config.train import TrainConfig
from medcap.train.recipe import fit


def dry_run(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` for ``train.dry_run_steps`` steps with random weights of the same architecture.

    Uses the first ``train.dry_run_images`` rows of the configured data when its manifests exist,
    otherwise a small phantom dataset generated into a temporary folder. Nothing is written next to
    the real run. On a CPU it runs smaller (``dry_run_cpu_settings``: micro-batch at most 2, at most
    2 accumulated, every core, no half precision the CPU multiplies only slowly) and says so. Returns fit()'s
    summary plus ``data`` (which data was used), ``batch_size`` and ``cpu_adjustments``.
    """
    import torch

    tc = cfg.train
    with tempfile.TemporaryDirectory(prefix="medcap-dry-run-") as tmp_name:
        tmp = Path(tmp_name)
        data = cfg.data
        have_data = data.manifest(data.train_split).is_file() and data.manifest(data.valid_split).is_file()
        if have_data:
            source = f"first {tc.dry_run_images} rows of {data.prepared}"
        else:
            source = f"{tc.dry_run_images} phantom images (no manifests at {data.prepared})"
            data = dataclasses.replace(
                data,
                prepared=dry_run_phantoms(tmp, tc.dry_run_images, tc.seed),
                train_split="train",
                valid_split="valid",
            )
        data = dataclasses.replace(
            data,
            max_train_samples=tc.dry_run_images,
            max_eval_samples=max(2, tc.dry_run_images // 4),
        )
        model = dataclasses.replace(cfg.model, random_init=True)
        train = dataclasses.replace(
            tc,
            batch_size=tc.dry_run_batch_size or tc.batch_size,
            out_dir=tmp / "run",
            max_steps=tc.dry_run_steps,
            eval_every=None,
            save_every=None,
            patience=None,
            resume=False,
            num_sample_captions=min(tc.num_sample_captions, 1),
            log_every=1,
        )
        notes: list[str] = []
        if tc.cpu or not torch.cuda.is_available():
            model, train, notes = dry_run_cpu_settings(model, train)
            mib = tc.dry_run_mmap_threshold_mib
            if mib and fix_mmap_threshold(mib << 20):
                notes.append(
                    f"glibc's mmap threshold fixed at {mib} MiB (train.dry_run_mmap_threshold_mib): freed "
                    "activations leave the process, so its peak RSS is the memory the step really holds"
                )
        print(
            f"dry run: {cfg.model.name_or_path} with random weights, {tc.dry_run_steps} steps of "
            f"{train.grad_accum} micro-batch(es) of {train.batch_size} on {source}"
        )
        for note in notes:
            print(f"  on this CPU: {note}")
        result = fit(dataclasses.replace(cfg, data=data, model=model, train=train))
        result["data"] = source
        result["batch_size"] = train.batch_size
        result["cpu_adjustments"] = notes
    return result


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for the rest of this process; False off glibc.

    By default glibc raises the threshold to the size of each mmapped block freed (up to 32 MiB), so
    a training step's mid-size tensors (one layer's activations, a 4-bit layer's dequantised weight)
    come from the heap after the first step; blocks that outlive them (each checkpointed layer's
    input) pin the freed space between them, and the heap never shrinks. Measured on Qwen2.5-VL-7B
    QLoRA (random weights, this CPU): peak RSS 14.65 GB under the default, 11.68 GB with the threshold
    fixed (about 0.1 GB a decoder layer), none of it memory the step holds. A GPU's caching allocator reuses
    such blocks (the planner's slack), so the dry run's peak, the planner's check on a CPU, is made
    to read what is alive. Costs page faults on every block of 1 MiB or more: x1.19 step time on that
    QLoRA model cut to 6 layers, none measurable on Qwen3-VL-4B in bf16; a dry run can spend it
    (benchmarks/bench_fullsize_families_cpu.py --ab-allocator). Fixed for good: glibc has no call
    that gives back the dynamic threshold.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave otherwise
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, nbytes) == 1


def dry_run_cpu_settings(
    model: ModelConfig, train: TrainConfig
) -> tuple[ModelConfig, TrainConfig, list[str]]:
    """What a dry run changes on a CPU so that a GPU config's full-size model finishes in minutes.

    The dry run checks that the config builds, trains (accumulation included), validates, captions
    and checkpoints; memory is `medcap plan`'s question. Measured on 2 cores with native bf16, the
    V100 config (6.7B fp16, batch 8 x 4 accumulated, checkpointing, 6 loader workers) took one torch
    thread and 8 minutes for its first step; micro-batch 2 took 80 s each on the fp32 path.
    Returns the changed settings and one line per change.
    """
    from medcap.model.cpu import cpu_has_native_half_matmul

    notes = []
    batch = train.dry_run_batch_size or min(train.batch_size, 2)
    if batch != train.batch_size:
        notes.append(
            f"micro-batch {batch} instead of train.batch_size {train.batch_size} (set train.dry_run_batch_size to choose)"
        )
    accum = min(train.grad_accum, 2)  # two micro-batches still go through the accumulation path
    if accum != train.grad_accum:
        notes.append(
            f"{accum} accumulated micro-batches a step instead of train.grad_accum {train.grad_accum}"
        )
    # fit() leaves a core to each loader worker (a GPU config asks for several); the dry run's loaders
    # decode a handful of images, so the model gets every core of its process.
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    threads = train.cpu_threads or max(1, (os.cpu_count() or 1) // world)
    train = dataclasses.replace(
        train,
        batch_size=batch,
        grad_accum=accum,
        eval_batch_size=min(train.eval_batch_size or train.batch_size, batch),
        cpu_threads=threads,
    )
    # Half precision the CPU cannot multiply natively: bitsandbytes layers multiply in the compute
    # dtype (measured: a 6.7B QLoRA fp16 micro-batch of 2 had not finished its backward after 7
    # minutes), plain layers through fp32 (model.cpu_fp32_matmul, 3-5x slower than native bf16).
    # Random weights make the half format's numerics moot; the config was checked as written.
    compute = model.compute_dtype if model.compute_dtype != "auto" else model.precision
    slow = {h for h in ("fp16", "bf16") if not cpu_has_native_half_matmul(h)}
    if compute in slow and (model.quantization != "none" or "bf16" not in slow):
        to = "bf16" if "bf16" not in slow else "fp32"  # fp32: only bnb layers lack the fp32 path
        model = dataclasses.replace(
            model,
            precision=to if model.precision in slow else model.precision,
            compute_dtype=to if model.compute_dtype in slow else model.compute_dtype,
        )
        if train.mixed_precision in slow:
            train = dataclasses.replace(train, mixed_precision="bf16" if to == "bf16" else "no")
        native = ", bf16 natively" if to == "bf16" else ""
        notes.append(f"{to} instead of {compute} (this CPU multiplies {compute} only slowly{native})")
    return model, train, notes


def dry_run_phantoms(tmp: Path, n: int, seed: int) -> Path:
    """Generate and prepare a small phantom dataset; returns the prepared folder."""
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    root, prepared = tmp / "phantoms", tmp / "prepared"
    # n training images plus a quarter of that for validation and test.
    # Small images: the dry run checks the pipeline, and the processor resizes them anyway.
    make_phantoms(root, n=n + 2 * max(2, n // 4), seed=seed, size_range=(96, 192), progress=False)
    prepare_dataset(root, prepared, color_policy="all", progress=False)
    return prepared
