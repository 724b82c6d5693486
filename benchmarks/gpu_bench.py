"""BLIP2-OPT-6.7B training speed and memory on a GPU, with a naive baseline in the same run.

On a lent H100/H200 (no network; torch is there, carry wheels of transformers, tokenizers, peft
and bitsandbytes at this venv's versions). Here, in the repo root (``.gpucheck`` in
``.git/info/exclude``; the wheels downloaded once with ``pip download --no-deps --only-binary=:all:
--python-version 3.12 --platform manylinux_2_24_x86_64 ...``)::

    rm -rf .gpucheck && mkdir -p .gpucheck/repo && git archive HEAD | tar -x -C .gpucheck/repo
    cp -r WHEELS_DIR .gpucheck/whl

then run (device tool, ``carry: [".gpucheck"]``, timeout 420)::

    cd .gpucheck && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
        --upgrade --target /tmp/site whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD/repo PYTHONUNBUFFERED=1 \\
      && cd repo && python3 benchmarks/gpu_bench.py --quick --profile 5 --out $OUT

As ``train.fit`` does, cuDNN attention is switched off (``model.set_cuda_attention_backends``;
``--cudnn-sdpa`` keeps PyTorch's default, and one quick case turns it on, for the A/B) and the CUDA
allocator grows expandable segments (``model.set_cuda_allocator_defaults``; ``--fixed-segments`` for
the A/B); batches are padded to a multiple of 8 (one case without), and every step's time and width
is recorded: per-shape set-up shows as slow steps at new widths. Results of the runs so far are in
``benchmarks/results/`` and docs/PERFORMANCE.md.

``--families`` runs ``gpu_bench_families.py`` instead: one shipped config of each image-text-to-text
family (Qwen2.5-VL QLoRA, Qwen3-VL, LLaVA-NeXT, PaliGemma 2, Idefics3 / SmolVLM, Gemma 3 / MedGemma,
InstructBLIP), ours against a notebook-style baseline, MFU and the planner's memory, in the same way.

What it does, all in one process on random weights (``random_init``: the shipped config, no hub):

1. measures the card's bf16 matmul rate (8192^3 products) - the denominator of MFU;
2. builds the random bf16 model once, saves it to a local folder, and loads every variant from there
   through ``build_model`` (bf16 LoRA; 4-bit NF4 QLoRA; 8-bit fp16, the notebook's recipe);
3. per case, trains a few LoRA (q,v r=16) steps on batches at ROCOv2 caption lengths (sampled from the
   real valid-caption token lengths, ``rocov2_caption_lengths.json``), our path (collator labels,
   length-bucketed batches, summed token loss) with gradient checkpointing on or off at several batch
   sizes, and prints samples/s, MFU = model FLOPs per sample (``medcap.plan``, real tokens only: padding
   is waste) x samples/s / measured bf16 rate, peak memory (allocated and reserved) and the planner's
   prediction for the same case;
4. the naive loop of the common BLIP-2 PEFT notebook (random order, every sequence padded to the
   maximum length, labels = input_ids: pads in the loss), compared with ours like for like, in the same
   run: with the same weights (precision and quantisation) at the same batch, and at the same memory
   budget (the naive loop at the largest batch whose peak fits the peak of our largest batch without
   checkpointing: the planner, calibrated on the naive loop's own measured peak, picks the batch and
   the run measures it); and at the notebook's recipe (8-bit weights, fp16, batch 3), our loop on the
   same recipe against it;
5. the recipe comparison, labelled as one: our best case (bf16, large batch) against the notebook's
   recipe (LLM.int8, batch 3). It measures what a user gets by switching recipe (precision,
   quantisation, batch, loop all at once), not what our loop does better;
6. the cached-query path (``medcap.train.query_cache``): query outputs computed once, the vision tower freed,
   the same steps from the cache: the per-epoch speed-up from the second epoch on;

and writes everything to ``OUT/gpu_bench.json`` (``results``: one entry per case; ``comparisons``: each
ratio with its kind, the two cases and their batches and peaks). ``--quick`` keeps the whole run
short (81 s with ``--steps 6`` on an H200 before the like-for-like cases were added: they add five or
six cases of a few seconds each); ``--device cpu --model tiny`` runs the same code on the tiny model,
every comparison included (the test suite does).
Targets (issue 6): bf16 LoRA >= 45% MFU; QLoRA 6.7B < 15 GB peak at batch 8 with checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
LENGTHS_FILE = HERE / "rocov2_caption_lengths.json"
MODELS = {
    "blip2-opt-6.7b": "Salesforce/blip2-opt-6.7b",
    "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "tiny": "tiny",
}


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    name: str
    weights: str  # "bf16" | "4bit" | "8bit-fp16"
    batch: int
    ckpt: bool
    loop: str = "ours"  # "ours" | "naive" | "cached"
    pad8: bool = True  # collator pad_to_multiple_of=8 (ours/cached; the naive loop pads to the max)
    cudnn: bool = False  # let SDPA use cuDNN attention for this case (the A/B of set_cuda_attention_backends)
    budget_of: int | None = None  # naive only: its batch is the largest that fits ours' peak at this batch


NAIVE = "naive loop (random order, padded to the max, labels=input_ids)"
NOTEBOOK = "naive: 8-bit fp16, padded, labels=input_ids"  # the notebook's whole recipe


def cases_for(quick: bool, device: str) -> list[Case]:
    """The cases to run (grouped by weights so each model is loaded once).

    Every group that has our loop without checkpointing also runs the naive loop at the same batch
    (like for like); the same-memory case of the naive loop is added while the run goes (its batch
    depends on measured peaks: ``budget_case``).
    """
    if device == "cpu":  # the code path check of the test suite: every group, loop and comparison
        return [
            Case("bf16 LoRA", "bf16", 4, False),
            Case("bf16 LoRA", "bf16", 6, False),
            Case(f"{NAIVE}, bf16", "bf16", 4, False, "naive"),  # + the same-memory run at batch 6
            Case("bf16 LoRA ckpt", "bf16", 4, True),
            Case("bf16 LoRA cached queries", "bf16", 4, False, "cached"),
            Case("QLoRA nf4 ckpt", "4bit", 4, True),
            Case("ours on the notebook's recipe: 8-bit fp16", "8bit-fp16", 3, False),
            Case(NOTEBOOK, "8bit-fp16", 3, False, "naive"),
        ]
    if quick:
        # The repeats run the same batches again once every shape has been seen: the gap to the first
        # run is per-shape set-up (kernel selection, graph builds), not steady-state speed.
        return [
            Case("bf16 LoRA", "bf16", 16, False),
            Case("bf16 LoRA", "bf16", 32, False),
            Case("bf16 LoRA", "bf16", 64, False),
            Case(f"{NAIVE}, bf16", "bf16", 32, False, "naive"),
            Case(f"{NAIVE}, bf16", "bf16", 64, False, "naive"),
            Case("bf16 LoRA ckpt", "bf16", 32, True),
            Case("bf16 LoRA ckpt", "bf16", 64, True),
            Case("bf16 LoRA, repeat (shapes seen)", "bf16", 32, False),
            Case("bf16 LoRA, no pad-to-8", "bf16", 32, False, pad8=False),
            Case("bf16 LoRA, cuDNN attention on", "bf16", 32, False, cudnn=True),
            Case("bf16 LoRA cached queries", "bf16", 32, False, "cached"),
            Case("QLoRA nf4 ckpt", "4bit", 8, True),
            Case("QLoRA nf4", "4bit", 8, False),
            Case(f"{NAIVE}, QLoRA nf4", "4bit", 8, False, "naive"),
            Case("ours on the notebook's recipe: 8-bit fp16", "8bit-fp16", 3, False),
            Case(NOTEBOOK, "8bit-fp16", 3, False, "naive"),
        ]
    return (
        [Case("bf16 LoRA", "bf16", b, False) for b in (4, 8, 16, 32, 64)]
        + [Case(f"{NAIVE}, bf16", "bf16", b, False, "naive") for b in (16, 32, 64)]
        + [Case("bf16 LoRA ckpt", "bf16", b, True) for b in (16, 32, 64)]
        + [Case("bf16 LoRA cached queries", "bf16", b, False, "cached") for b in (16, 32)]
        + [Case("QLoRA nf4 ckpt", "4bit", b, True) for b in (4, 8, 16)]
        + [Case("QLoRA nf4", "4bit", 8, False), Case(f"{NAIVE}, QLoRA nf4", "4bit", 8, False, "naive")]
        + [
            Case("ours on the notebook's recipe: 8-bit fp16", "8bit-fp16", 3, False),
            Case(NOTEBOOK, "8bit-fp16", 3, False, "naive"),
        ]
    )


def budget_case(group_results: list[dict], weights: str, max_batch: int) -> Case | None:
    """The naive loop at the largest batch whose peak fits the peak of our largest batch without
    checkpointing in this group (same weights), or None when the group lacks the two measurements.

    The budget is ours' measured peak (``max_memory_reserved``; on the CPU, which has no allocator to
    ask, the planner's figure for ours). The naive loop's peak at batch b is the planner's figure for
    b scaled by the naive loop's own measured / planned ratio at the batch nearest to ours that it ran
    (so the planner's small bias cancels); the largest b within the budget is then run and measured.
    """
    ok = [r for r in group_results if "error" not in r and not r["gradient_checkpointing"]]
    ours = [r for r in ok if r["loop"] == "ours" and r.get("planned_gib")]
    naive = [r for r in ok if r["loop"] == "naive" and r.get("planned_gib")]
    if not ours or not naive:
        return None
    ref = max(ours, key=lambda r: r["batch"])
    budget = ref.get("peak_reserved_gib") or ref["planned_gib"]
    # Calibrate the planner on the naive run nearest in batch (the same batch where there is one).
    near = min(naive, key=lambda r: abs(r["batch"] - ref["batch"]))
    calibration = (near.get("peak_reserved_gib") or near["planned_gib"]) / near["planned_gib"]
    per_batch = near["planned_by_batch_gib"]
    fits = [int(b) for b, gib in per_batch.items() if int(b) <= max_batch and gib * calibration <= budget]
    if not fits:
        return None
    return Case(
        f"{NAIVE}, {weights}, same memory as ours at batch {ref['batch']}",
        weights,
        max(fits),
        False,
        "naive",
        budget_of=ref["batch"],
    )


# ---------------------------------------------------------------------------------------------
# Caption lengths
# ---------------------------------------------------------------------------------------------


def write_lengths(csv_path: Path) -> Path:
    """Histogram of caption token lengths (shipped offline BPE) of the real ROCOv2 valid captions."""
    import csv

    from medcap.model.tokenizer import offline_tokenizer

    with csv_path.open(newline="", encoding="utf-8") as f:
        caps = [" ".join(r["Caption"].split()) for r in csv.DictReader(f)]
    caps = [c for c in caps if c]
    tok = offline_tokenizer("bos-first")
    hist: dict[int, int] = {}
    for ids in tok(caps, add_special_tokens=False)["input_ids"]:
        hist[len(ids)] = hist.get(len(ids), 0) + 1
    LENGTHS_FILE.write_text(
        json.dumps(
            {
                "source": "ROCOv2 valid captions (../shared/data/rocov2-valid), medcap's shipped offline BPE",
                "captions": len(caps),
                "histogram": {str(k): v for k, v in sorted(hist.items())},
            },
            indent=0,
        ),
        encoding="utf-8",
    )
    return LENGTHS_FILE


def sample_lengths(n: int, seed: int) -> list[int]:
    data = json.loads(LENGTHS_FILE.read_text(encoding="utf-8"))
    values = [int(k) for k in data["histogram"]]
    weights = list(data["histogram"].values())
    return random.Random(seed).choices(values, weights=weights, k=n)


def caption_of_tokens(tokenizer, n: int) -> str:
    """A caption that the tokenizer splits into exactly ``n`` tokens (a repeated one-token word)."""
    for word in ("the", "of", "and", "with", "in", "a"):
        if len(tokenizer(" ".join([word] * 10), add_special_tokens=False)["input_ids"]) == 10:
            return " ".join([word] * n)
    raise RuntimeError("no one-token word found in the tokenizer")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def save_random_base(model_name: str, folder: Path) -> None:
    """Build the random bf16 architecture once (no PEFT) and save it with its processor."""
    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.model.build import build_model

    cfg = ModelConfig(
        name_or_path=MODELS[model_name], random_init=True, precision="bf16", peft=PeftSettings(method="none")
    )
    model, processor = build_model(cfg, verbose=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model


def model_config(source: str, weights: str, ckpt: bool):
    from medcap.config.model import ModelConfig, PeftSettings

    lora = PeftSettings(method="lora", r=16, alpha=32, dropout=0.05, targets="lm-qv")
    tiny = source == "tiny"
    if weights == "bf16":
        return ModelConfig(name_or_path=source, precision="bf16", gradient_checkpointing=ckpt, peft=lora)
    if weights == "4bit":
        return ModelConfig(
            name_or_path=source,
            precision="bf16",
            quantization="4bit",
            compute_dtype="bf16",
            gradient_checkpointing=ckpt,
            peft=lora,
            random_init=tiny,
        )
    return ModelConfig(
        name_or_path=source, precision="fp16", quantization="8bit", gradient_checkpointing=ckpt, peft=lora
    )


def set_checkpointing(model, on: bool) -> None:
    from medcap.model.adapters import unwrap as _unwrap

    inner = _unwrap(model)
    if on:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inner.language_model.enable_input_require_grads()
    else:
        inner.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def matmul_tflops(device: str) -> float:
    """Measured bf16 matmul rate (TFLOP/s): mean of timed 8192^3 products after warm-up."""
    import torch

    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def make_batches(
    collator, tokenizer, lengths: list[int], batch: int, steps: int, seed: int, loop: str, cap: int
):
    """``steps`` batches of ``batch`` samples at the sampled caption lengths.

    ours / cached: bucketed like ``train.epoch_batches`` (sorted inside mega-batches); naive: random
    order, padded to the maximum length afterwards.
    """
    from PIL import Image

    from medcap.train.batches import epoch_batches

    n = batch * steps
    pool = lengths[: n * 4] if loop != "naive" else lengths[:n]
    if loop == "naive":
        order = [list(range(i, i + batch)) for i in range(0, n, batch)]
    else:
        order = epoch_batches(pool, batch, seed, 0, bucket=True)[:steps]
    blank = Image.new("RGB", (64, 64))
    out = []
    for idx in order:
        out.append(collator([(blank, caption_of_tokens(tokenizer, min(pool[i], cap))) for i in idx]))
    return out


def planned_gib(meta, family, plan_spec, trainable, model_cfg, case: Case, max_len: int):
    """``batch -> GiB`` the planner gives ``case`` on one H100-sized GPU (CUDA context included),
    every sequence at the maximum length (the naive loop pads to it; ours' widest bucket reaches it)."""
    from medcap import plan as plan_lib
    from medcap.plan.memory import memory_for_batch, weight_bytes

    weights = weight_bytes(meta, model_cfg, family)
    cfg = replace(model_cfg, gradient_checkpointing=case.ckpt)
    mixed = "bf16" if model_cfg.precision == "bf16" else "fp16"

    def planned(batch: int) -> float:
        mem = memory_for_batch(
            batch,
            max_len,
            plan_spec,
            trainable,
            *weights,
            cfg,
            "adamw",
            mixed,
            plan_lib.GPUS["h100"],
            1,
            "cuda",
        )
        return mem.total / 2**30

    return planned


def run_case(
    case: Case,
    model,
    processor,
    model_cfg,
    device: str,
    steps: int,
    warmup: int,
    lengths,
    seed: int,
    cap: int,
    bf16_tflops: float,
):
    """Train ``warmup + steps`` steps of ``case``; returns the measurements."""
    import torch

    from medcap import plan as plan_lib
    from medcap.plan.memory import trainable_parameters
    from medcap.train import query_cache as features
    from medcap.train.loss import label_token_count, token_loss_sum

    collator = model.medcap_family.collator(
        processor, model_cfg, cap, pad_to_multiple_of=8 if case.pad8 and case.loop != "naive" else 1
    )
    prefix = len(collator.prompt_ids)
    tok = processor.tokenizer
    batches = make_batches(collator, tok, lengths, case.batch, warmup + steps, seed, case.loop, cap)
    dtype = torch.bfloat16 if model_cfg.precision == "bf16" else torch.float16
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    max_len = prefix + cap + 1
    cache_seconds = None
    if case.loop == "cached":
        # Compute the query outputs of the batches' images once (timed: the one-off cost of epoch 1).
        t0 = time.perf_counter()
        with torch.no_grad():
            qs = [
                features.query_outputs(model, b["pixel_values"].to(device)).to(torch.float16) for b in batches
            ]
        _sync(device)
        cache_seconds = (time.perf_counter() - t0) / sum(len(q) for q in qs)
        for b, q in zip(batches, qs, strict=True):
            b["query_embeds"] = q
            b.pop("pixel_values")
        # Train without the vision side: free it (the memory this path saves shows in the peak).
        features.strip_vision(model)
    model.train()
    at_start = None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # What this case starts with (its model, the previous cases' leftovers): the peak includes it.
        at_start = torch.cuda.memory_allocated()
    real_tokens = padded_tokens = 0
    t_start = None
    step_seconds: list[float] = []
    t_prev = 0.0
    for k, b in enumerate(batches):
        _sync(device)
        t_step = time.perf_counter()
        if k == warmup:
            t_start = t_step
        if k > 0:
            step_seconds.append(t_step - t_prev)
        t_prev = t_step
        b = {key: (v.to(device) if hasattr(v, "to") else v) for key, v in b.items()}
        with autocast:
            if case.loop == "naive":
                ids = b["input_ids"]
                padded = torch.full(
                    (ids.shape[0], max_len), tok.pad_token_id, dtype=ids.dtype, device=ids.device
                )
                padded[:, : ids.shape[1]] = ids
                mask = (padded != tok.pad_token_id).long()
                out = model(
                    pixel_values=b["pixel_values"].to(dtype),
                    input_ids=padded,
                    attention_mask=mask,
                    labels=padded,
                )
                loss = out.loss
                n_real, n_pad = int(b["attention_mask"].sum()), padded.numel()
            else:
                labels = b.pop("labels")
                if case.loop == "cached":
                    out = features.forward_from_cache(model, {**b, "labels": labels})
                else:
                    b["pixel_values"] = b["pixel_values"].to(dtype)
                    out = model(**b)
                loss = token_loss_sum(out.logits, labels, True) / label_token_count(labels, True).clamp(min=1)
                n_real, n_pad = int(b["attention_mask"].sum()), b["input_ids"].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            real_tokens += n_real
            padded_tokens += n_pad
    _sync(device)
    seconds = time.perf_counter() - t_start
    step_seconds.append(time.perf_counter() - t_prev)
    samples = case.batch * steps
    sps = samples / seconds
    # Model FLOPs per sample at the mean REAL length (padding is waste, not useful work).
    meta, family = plan_lib.meta_model(model_cfg)
    plan_spec = family.plan_spec(meta)
    trainable = trainable_parameters(meta, model_cfg, family)
    mean_len = real_tokens / samples
    flops = plan_spec.flops(trainable, model_cfg, mean_len)
    model_flops = flops.model - (flops.vision_fwd + flops.connector_fwd if case.loop == "cached" else 0)
    mfu = model_flops * sps / (bf16_tflops * 1e12)
    result = {
        "case": case.name,
        "weights": case.weights,
        "batch": case.batch,
        "gradient_checkpointing": case.ckpt,
        "loop": case.loop,
        "samples_per_s": sps,
        "seconds_per_step": seconds / steps,
        "step_seconds": step_seconds,  # every step, warm-up included: per-shape set-up shows here
        "widths": [int(b["input_ids"].shape[1]) for b in batches],
        "pad_to_multiple_of_8": case.pad8 and case.loop != "naive",
        "cudnn_sdpa": case.cudnn,
        "mean_real_tokens": mean_len,
        "padding_waste": 1 - real_tokens / padded_tokens,
        "model_tflop_per_sample": model_flops / 1e12,
        "mfu": mfu,
        "loss_last": float(loss.detach()),
        "cache_build_s_per_image": cache_seconds,
    }
    if device == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["allocated_at_start_gib"] = at_start / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if case.loop != "cached":  # the planner counts the vision tower, which the cached path freed
        # The planner's peak for this case (on the CPU too: the same-memory comparison needs it where
        # no allocator can be asked), and for the naive loop at other batches (``budget_case``).
        planned = planned_gib(meta, family, plan_spec, trainable, model_cfg, case, max_len)
        result["planned_gib"] = planned(case.batch)
        if device == "cuda":
            result["planned_over_measured"] = result["planned_gib"] / result["peak_reserved_gib"]
        if case.loop == "naive":
            result["planned_by_batch_gib"] = {
                str(b): planned(b) for b in range(1, max(4 * case.batch, 16) + 1)
            }
    if case.budget_of is not None:
        result["budget_of_batch"] = case.budget_of
        result["budget_run"] = True  # run for the same-memory comparison only
    return result


@dataclass
class Bench:
    """What the cases of one weights group share: the loaded model and the run's settings."""

    model: Any
    processor: Any
    cfg: Any
    args: argparse.Namespace
    steps: int
    warmup: int
    lengths: list[int]
    bf16_tflops: float
    stale_bytes: int
    cases: list[Case]
    results: list[dict]

    def run(self, case: Case) -> dict:
        """Run one case (isolated: an error is recorded and the next case still runs) and record it."""
        import torch

        from medcap.model.cuda import set_cuda_attention_backends

        args = self.args
        index = self.cases.index(case) if case in self.cases else -1
        prof = _profiler(args.device) if args.profile == index else contextlib.nullcontext()
        try:
            set_checkpointing(self.model, case.ckpt)
            before = set_cuda_attention_backends(cudnn=case.cudnn or args.cudnn_sdpa)
            with prof:
                r = run_case(
                    case,
                    self.model,
                    self.processor,
                    replace(self.cfg, gradient_checkpointing=case.ckpt),
                    args.device,
                    self.steps,
                    self.warmup,
                    self.lengths,
                    args.seed,
                    args.cap,
                    self.bf16_tflops,
                )
            set_cuda_attention_backends(cudnn=before)
        except Exception as e:
            traceback.print_exc()
            set_cuda_attention_backends(cudnn=args.cudnn_sdpa)
            r = {"case": case.name, "batch": case.batch, "error": f"{type(e).__name__}: {e}"}
            if args.device == "cuda":
                torch.cuda.empty_cache()
        if args.profile == index and not isinstance(prof, contextlib.nullcontext):
            _print_profile(prof, args.device)
        r["stale_before_build_gib"] = self.stale_bytes / 2**30
        self.results.append(r)
        _print_row(r)
        return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--families" in argv:
        # One shipped config of each image-text-to-text family: gpu_bench_families.py, its options.
        import gpu_bench_families

        return gpu_bench_families.main([a for a in argv if a != "--families"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--families",
        action="store_true",
        help="instead: one shipped config of each image-text-to-text family (gpu_bench_families.py; "
        "its options: --device, --tiny, --steps, --batch-size, --only, --out)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--model", choices=sorted(MODELS), default="blip2-opt-6.7b")
    p.add_argument("--quick", action="store_true", help="fewer cases and steps: under ~8 minutes on an H100")
    p.add_argument("--steps", type=int, help="timed steps per case (default 6, quick 4, cpu 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cap", type=int, default=64, help="caption tokens kept (train.max_caption_tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cudnn-sdpa",
        action="store_true",
        help="leave cuDNN attention enabled (PyTorch's default; per-shape plan builds): the A/B of "
        "model.set_cuda_attention_backends",
    )
    p.add_argument(
        "--fixed-segments",
        action="store_true",
        help="keep the CUDA allocator's default segments (fit() turns on expandable segments)",
    )
    p.add_argument(
        "--profile",
        metavar="N",
        type=int,
        help="run case number N (0-based, in the printed order) under torch.profiler and print its top ops",
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument(
        "--write-lengths", type=Path, metavar="CAPTIONS_CSV", help="(re)write the length histogram"
    )
    args = p.parse_args(argv)
    if args.write_lengths:
        print(write_lengths(args.write_lengths))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --model tiny for the CPU check", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.device == "cpu" else 4 if args.quick else 6)
    warmup = 1 if args.device == "cpu" else args.warmup
    t_all = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "quick": args.quick,
        "steps": steps,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    from medcap.model.cuda import set_cuda_allocator_defaults, set_cuda_attention_backends

    set_cuda_attention_backends(cudnn=args.cudnn_sdpa)
    info["cudnn_sdpa"] = args.cudnn_sdpa
    # As fit() does, unless --fixed-segments asks for the allocator's default (the A/B).
    info["cuda_allocator"] = None if args.fixed_segments else set_cuda_allocator_defaults()
    rate = matmul_tflops(args.device)
    info["bf16_matmul_tflops_measured"] = rate
    print(f"{info['device']}: bf16 matmul {rate:.1f} TFLOP/s measured", flush=True)
    lengths = sample_lengths(4096, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="medcap-gpu-bench-") as tmp:
        source = "tiny"
        if args.model != "tiny":
            t0 = time.perf_counter()
            source = str(Path(tmp) / "random-base")
            save_random_base(args.model, Path(source))
            info["random_base_build_and_save_s"] = time.perf_counter() - t0
        from medcap.model.build import build_model

        cases = cases_for(args.quick, args.device)
        for weights in dict.fromkeys(c.weights for c in cases):
            group = [c for c in cases if c.weights == weights]
            cfg = model_config(source, weights, group[0].ckpt)
            stale = _free_previous_model(args.device)
            t0 = time.perf_counter()
            try:
                model, processor = build_model(cfg, verbose=True)
                model.to(args.device) if cfg.quantization == "none" else None
            except Exception as e:  # one failed variant must not lose the others' numbers
                traceback.print_exc()
                results.append({"case": weights, "error": f"build: {type(e).__name__}: {e}"})
                continue
            print(f"loaded {weights} in {time.perf_counter() - t0:.1f} s", flush=True)

            # Cached last: it frees the vision tower. Before it, the naive loop at the largest batch
            # within ours' peak (its batch depends on the peaks just measured).
            bench = Bench(model, processor, cfg, args, steps, warmup, lengths, rate, stale, cases, results)
            done = [bench.run(c) for c in group if c.loop != "cached"]
            extra = budget_case(done, weights, max_batch=4 * max(c.batch for c in group))
            if extra is not None:
                same = [r for r in done if r.get("loop") == "naive" and r["batch"] == extra.batch]
                if same:  # already measured at that batch: it is the same-memory case too
                    same[0]["budget_of_batch"] = extra.budget_of
                else:
                    bench.run(extra)
            for case in (c for c in group if c.loop == "cached"):
                bench.run(case)
            del bench
            del model
    info["total_s"] = time.perf_counter() - t_all
    compared = _summary(results)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "gpu_bench.json"
    out.write_text(
        json.dumps({"info": info, "results": results, "comparisons": compared}, indent=1), encoding="utf-8"
    )
    print(f"wrote {out} ({info['total_s']:.0f} s in all)")
    return 0 if all("error" not in r for r in results) else 1


def _free_previous_model(device: str) -> int:
    """Free the previous group's model before the next is built; returns the bytes still held (CUDA:
    allocated; CPU: parameters of BLIP-2 models still alive).

    What a model build leaves in reference cycles is freed only when Python's cyclic collector next
    runs, which depends on unrelated allocations. The naive 8-bit case, built right after the QLoRA
    group, measured 15.2 / 11.5 / 15.1 GiB peak in three runs of the same case; the excess, 3.65 /
    3.57 GiB, is the QLoRA model's nf4 weights (3.57 GiB planned): most likely still allocated.
    Found on the CPU under pytest (the test of this script): the first build's frame stayed alive
    through the traceback of an exception that bitsandbytes logs while peft is first imported, and
    with it the model; ``model.import_backends`` now imports before any frame holds a model.
    ``allocated_at_start_gib`` and ``stale_before_build_gib`` in the JSON show what is left.
    """
    gc.collect()
    if device != "cuda":
        # No allocator to ask on the CPU: the parameters of BLIP-2 models still alive.
        from transformers import Blip2ForConditionalGeneration

        alive = [o for o in gc.get_objects() if isinstance(o, Blip2ForConditionalGeneration)]
        return sum(p.numel() * p.element_size() for m in alive for p in m.parameters())
    import torch

    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _profiler(device: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return profile(activities=acts)


def _print_profile(prof, device: str) -> None:
    """The ops that took the time: by self device time (GPU) and by self CPU time (launch, set-up)."""
    table = prof.key_averages()
    if device == "cuda":
        try:  # the key's name changed across torch releases
            text = table.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
        except (KeyError, AttributeError, ValueError):
            text = table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
        print(text, flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['case']:<46} batch {r.get('batch', '-')}: ERROR {r['error']}", flush=True)
        return
    mem = f"{r['peak_reserved_gib']:6.1f} GiB" if "peak_reserved_gib" in r else ""
    if "planned_gib" in r:
        mem += f" (plan {r['planned_gib']:5.1f})"
    if r.get("stale_before_build_gib", 0) > 0.05:
        mem += f" [{r['stale_before_build_gib']:.1f} GiB of an earlier model still allocated: peak inflated]"
    print(
        f"  {r['case']:<46} b={r['batch']:<3} {r['samples_per_s']:8.2f} samples/s  MFU {100 * r['mfu']:5.1f}%  "
        f"pad {100 * r['padding_waste']:4.1f}%  {mem}",
        flush=True,
    )
    if r.get("step_seconds"):
        steps = " ".join(f"{t:.2f}" for t in r["step_seconds"])
        print(f"    step seconds (warm-up first): {steps}; widths {r.get('widths')}", flush=True)


def _plain_ours(ok: list[dict], weights: str, batch: int, ckpt: bool) -> dict | None:
    """Our loop at ``batch`` with ``weights``, in its default settings (pad-to-8, no cuDNN, first run)."""
    return next(
        (
            r
            for r in ok
            if r["loop"] == "ours"
            and r["weights"] == weights
            and r["batch"] == batch
            and r["gradient_checkpointing"] == ckpt
            and r["pad_to_multiple_of_8"]
            and not r["cudnn_sdpa"]
        ),
        None,
    )


def _peak(r: dict) -> float | None:
    return r.get("peak_reserved_gib")


def comparisons(results: list[dict]) -> list[dict]:
    """Our loop against the naive loop, each pair measured in this run.

    * ``same weights, same batch``: like for like (precision, quantisation, batch, checkpointing);
    * ``same weights, same memory``: like for like, the naive loop at the largest batch whose peak
      fits ours' peak (``budget_case``);
    * ``recipe``: our fastest bf16 LoRA case (on a GPU: a large batch) against the notebook's whole
      recipe (LLM.int8 fp16, batch 3): what a user gets by switching recipe, NOT a like-for-like
      comparison of the loops.
    """
    ok = [r for r in results if "error" not in r]
    out = []
    for naive in (r for r in ok if r["loop"] == "naive"):
        ours = _plain_ours(ok, naive["weights"], naive["batch"], naive["gradient_checkpointing"])
        if ours is not None and not naive.get("budget_run"):
            out.append(
                {
                    "kind": "like for like: same weights, same batch",
                    "weights": naive["weights"],
                    "ours": {"case": ours["case"], "batch": ours["batch"], "peak_reserved_gib": _peak(ours)},
                    "naive": {
                        "case": naive["case"],
                        "batch": naive["batch"],
                        "peak_reserved_gib": _peak(naive),
                    },
                    "ours_over_naive": ours["samples_per_s"] / naive["samples_per_s"],
                }
            )
        if naive.get("budget_of_batch") is not None:
            ours = _plain_ours(ok, naive["weights"], naive["budget_of_batch"], False)
            if ours is not None:
                out.append(
                    {
                        "kind": "like for like: same weights, same memory",
                        "weights": naive["weights"],
                        # Measured on a GPU; the planner's figure where no allocator can be asked (CPU).
                        "budget_gib": _peak(ours) or ours["planned_gib"],
                        "budget_measured": _peak(ours) is not None,
                        "ours": {
                            "case": ours["case"],
                            "batch": ours["batch"],
                            "peak_reserved_gib": _peak(ours),
                        },
                        "naive": {
                            "case": naive["case"],
                            "batch": naive["batch"],
                            "peak_reserved_gib": _peak(naive),
                            "planned_gib": naive["planned_gib"],
                        },
                        "ours_over_naive": ours["samples_per_s"] / naive["samples_per_s"],
                    }
                )
    notebook = next((r for r in ok if r["case"] == NOTEBOOK), None)
    # Our recommended recipe (bf16 LoRA), its fastest case of this run.
    best = max(
        (r for r in ok if r["loop"] == "ours" and r["weights"] == "bf16"),
        key=lambda r: r["samples_per_s"],
        default=None,
    )
    if notebook and best:
        out.append(
            {
                "kind": "recipe comparison (not like for like): our best case against the notebook's recipe",
                "weights": f"{best['weights']} vs {notebook['weights']}",
                "ours": {"case": best["case"], "batch": best["batch"], "peak_reserved_gib": _peak(best)},
                "naive": {
                    "case": notebook["case"],
                    "batch": notebook["batch"],
                    "peak_reserved_gib": _peak(notebook),
                },
                "ours_over_naive": best["samples_per_s"] / notebook["samples_per_s"],
            }
        )
    return out


def _summary(results: list[dict]) -> list[dict]:
    ok = [r for r in results if "error" not in r]
    compared = comparisons(results)
    print("\nsummary")
    for c in compared:
        o, n = c["ours"], c["naive"]
        mem = ""
        if "budget_gib" in c:
            where = "measured" if c["budget_measured"] else "planned"
            mem = f" (budget: ours' peak at batch {o['batch']}, {c['budget_gib']:.1f} GiB {where})"
        print(
            f"  {c['kind']}, {c['weights']}: ours batch {o['batch']} vs naive batch {n['batch']}{mem}: "
            f"{c['ours_over_naive']:.2f}x samples/s"
        )
    bf16 = [r for r in ok if r["weights"] == "bf16" and r["loop"] == "ours"]
    if bf16:
        top = max(bf16, key=lambda r: r["mfu"])
        print(f"  bf16 LoRA best MFU {100 * top['mfu']:.1f}% (target 45%) at batch {top['batch']}")
    q8 = [r for r in ok if r["weights"] == "4bit" and r["gradient_checkpointing"] and r["batch"] == 8]
    if q8 and "peak_reserved_gib" in q8[0]:
        print(
            f"  QLoRA batch 8 with checkpointing: {q8[0]['peak_reserved_gib']:.1f} GiB peak (target < 15 GB)"
        )
    cached = [r for r in ok if r["loop"] == "cached"]
    for c in cached:
        same = _plain_ours(ok, "bf16", c["batch"], False)
        if same:
            print(
                f"  cached queries at batch {c['batch']}: {c['samples_per_s'] / same['samples_per_s']:.2f}x "
                f"per epoch from the second epoch (cache costs {c['cache_build_s_per_image'] * 1e3:.1f} ms/image once)"
            )
    if not math.isfinite(sum(r.get("samples_per_s", 0) for r in ok)):
        print("  non-finite timings")
    return compared


if __name__ == "__main__":
    sys.exit(main())
