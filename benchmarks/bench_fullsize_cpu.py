"""The full-size BLIP-2 training step on this CPU: our training path against a naive loop.

    flock /tmp/medcap-fullsize.lock .venv/bin/python benchmarks/bench_fullsize_cpu.py \
        [--model blip2-opt-6.7b|blip2-opt-2.7b] [--batch-size 2] [--steps 3] [--json out.json]
    flock /tmp/medcap-fullsize.lock .venv/bin/python benchmarks/bench_fullsize_cpu.py --measure-peak ...

The BLIP2-OPT architecture with random bf16 weights (``random_init``: no hub), LoRA q,v r=16 on the
language model, trained for a few steps on phantom JPEGs (ROCOv2-like sizes) with captions drawn from
the REAL ROCOv2 caption length distribution. Two loops run in the same process on the same model:

* ours: ``CaptionCollator`` (image tokens from the processor, labels -100 at padding, image tokens
  and prompt, EOS appended), batches bucketed by caption length (``train.epoch_batches``), summed
  token loss over label tokens (``train.token_loss_sum``);
* naive (the common BLIP-2 PEFT notebook): batches in random order, every sequence padded to the
  maximum length, ``labels = input_ids`` with the pads (and image tokens) left in the loss.

Both recompute the vision tower every step (``benchmarks/bench_features.py`` measures the cached
query path). Prints samples/s, peak resident memory of each loop and the ratio; this is the number
every later change to the training path is judged by between GPU sessions.

``--measure-peak`` instead runs our path on captions that all reach the length cap (so the sequence
length is exactly the planner's maximum) and prints the measured peak RSS next to
``medcap.plan``'s prediction for ``--gpu cpu``: the validation of the planner (within 15%).

Needs up to ~17 GB free RAM for 6.7B (about 8 GB for 2.7B): run it under the flock.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from benchdata import gb, machine_description, peak_rss_bytes, phantom_pairs, reset_peak_rss, rss_bytes

MODELS = {"blip2-opt-6.7b": "Salesforce/blip2-opt-6.7b", "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b"}


def _trim() -> None:
    """Give freed heap memory back to the OS so the next loop's peak RSS is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def kernel_check(hidden: int, rows: int, threads: int) -> dict:
    """One frozen bf16 ``hidden x hidden`` linear, forward and input gradient, PyTorch's bf16 products
    against ``medcap.model.CpuFp32Linear`` (what ``build_model`` uses on CPUs without native bf16).

    The full-size loops below both run on the fp32 path (the native one would take hours a step
    here); this shows what the path is worth on its own, at the loops' token count.
    """
    import torch

    from medcap.model.cpu import CpuFp32Linear

    torch.set_num_threads(threads)
    out = {"hidden": hidden, "rows": rows}
    for name, cls in (("native_bf16", torch.nn.Linear), ("fp32_path", CpuFp32Linear)):
        torch.manual_seed(0)
        layer = torch.nn.Linear(hidden, hidden, bias=True).to(torch.bfloat16).requires_grad_(False)
        layer.__class__ = cls
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, requires_grad=True)
        t0 = time.perf_counter()
        y = layer(x)
        t1 = time.perf_counter()
        y.float().sum().backward()
        t2 = time.perf_counter()
        out[name] = {"forward_s": t1 - t0, "backward_s": t2 - t1}
        print(
            f"  frozen bf16 linear {hidden}x{hidden}, {rows} rows, {name}: forward {t1 - t0:.3f} s, "
            f"input gradient {t2 - t1:.3f} s",
            flush=True,
        )
    n, f = out["native_bf16"], out["fp32_path"]
    out["speedup"] = (n["forward_s"] + n["backward_s"]) / (f["forward_s"] + f["backward_s"])
    print(f"  fp32 path / native bf16, forward + backward: {out['speedup']:.1f}x", flush=True)
    return out


def build(model_name: str, cap: int, seed: int, model_override: str | None = None, fp32_matmul: str = "auto"):
    """The random-weight bf16 model with LoRA q,v r=16, its processor and our collator."""
    import torch

    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.model.build import build_model

    cfg = ModelConfig(
        name_or_path=model_override or MODELS[model_name],
        random_init=True,
        init_seed=seed,
        precision="bf16",
        peft=PeftSettings(method="lora", r=16, alpha=32, dropout=0.05, targets="lm-qv"),
        cpu_fp32_matmul=fp32_matmul,
    )
    torch.manual_seed(seed)
    model, processor = build_model(cfg, verbose=True)
    collator = model.medcap_family.collator(processor, cfg, cap)
    return model, processor, collator, cfg


def _load(pairs, idx):
    from medcap.data.images import read_image

    return [(read_image(pairs[i][0]), pairs[i][1]) for i in idx]


def our_step(model, collator, batch_pairs) -> tuple[float, int]:
    """One step of our path; returns (loss, padded tokens in the batch)."""
    from medcap.train.loss import label_token_count, token_loss_sum

    batch = collator(batch_pairs)
    labels = batch.pop("labels")
    out = model(**batch)
    n = label_token_count(labels, True).clamp(min=1)
    loss = token_loss_sum(out.logits, labels, True) / n
    loss.backward()
    return float(loss.detach()), int(batch["input_ids"].numel())


def naive_step(model, collator, batch_pairs, max_len: int, pad_id: int) -> tuple[float, int]:
    """One step as the common notebook does it: padded to max length, labels = input_ids."""
    import torch

    batch = collator(batch_pairs)
    ids = batch["input_ids"]
    padded = torch.full((ids.shape[0], max_len), pad_id, dtype=ids.dtype)
    padded[:, : ids.shape[1]] = ids
    mask = (padded != pad_id).long()
    out = model(pixel_values=batch["pixel_values"], input_ids=padded, attention_mask=mask, labels=padded)
    out.loss.backward()
    return float(out.loss.detach()), int(padded.numel())


def cached_step_fn(model, collator, pairs, batches):
    """Our path from cached query embeddings (``medcap.train.query_cache``, ``train.query_cache``).

    The Q-Former outputs of the batches' images are computed once (the first epoch's cost, timed per
    image and returned), with the collated text; the step then trains the language model from them
    without running or loading the vision side, as every epoch after the first does.
    """
    import torch

    from medcap.train import query_cache as features
    from medcap.train.loss import label_token_count, token_loss_sum

    cache = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for idx in batches:
            b = collator(_load(pairs, idx))
            b["query_embeds"] = features.query_outputs(model, b.pop("pixel_values")).to(torch.float16)
            cache[tuple(idx)] = b
    per_image = (time.perf_counter() - t0) / sum(len(b) for b in batches)

    def step(idx) -> tuple[float, int]:
        b = dict(cache[tuple(idx)])
        labels = b.pop("labels")
        out = features.forward_from_cache(model, {**b, "labels": labels})
        loss = token_loss_sum(out.logits, labels, True) / label_token_count(labels, True).clamp(min=1)
        loss.backward()
        return float(loss.detach()), int(b["input_ids"].numel())

    return step, per_image


def run_loop(name, model, optimizer, step_fn, batches, pairs, load: bool = True) -> dict:
    """Time ``len(batches)`` optimizer steps (the first is a warm-up, not timed).

    ``step_fn`` gets the decoded (image, caption) pairs, or the batch's row indices if not ``load``.
    """
    _trim()
    rss_before = rss_bytes()
    reset_peak_rss()
    times, losses, tokens = [], [], 0
    for k, idx in enumerate(batches):
        t0 = time.perf_counter()
        loss, n_tok = step_fn(_load(pairs, idx) if load else idx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if k > 0:
            times.append(dt)
            tokens += n_tok
        print(f"  {name} step {k}: {dt:.2f} s, {len(idx)} samples, loss {loss:.3f}", flush=True)
    timed = sum(times)
    samples = sum(len(b) for b in batches[1:])
    return {
        "loop": name,
        "steps_timed": len(times),
        "seconds_per_step": timed / max(len(times), 1),
        "samples_per_s": samples / timed if timed else float("nan"),
        "padded_tokens_per_step": tokens / max(len(times), 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": rss_before,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="blip2-opt-6.7b")
    p.add_argument("--model-path", help="a local folder with a BLIP-2 config.json instead (scaled-down runs)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per loop (plus one warm-up)")
    p.add_argument("--cap", type=int, default=64, help="caption tokens kept (train.max_caption_tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--measure-peak", action="store_true", help="measure peak RSS at the length cap vs the planner"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--fp32-matmul",
        choices=["auto", "on", "off"],
        default="auto",
        help="model.cpu_fp32_matmul: frozen bf16 linears in fp32 (auto: where the CPU lacks native bf16)",
    )
    p.add_argument("--no-cache-loop", action="store_true", help="skip the cached-query loop")
    args = p.parse_args(argv)

    import torch

    from medcap import plan as plan_lib
    from medcap.model.cpu import cpu_has_native_half_matmul
    from medcap.train.batches import epoch_batches

    torch.set_num_threads(args.threads)
    native = cpu_has_native_half_matmul("bf16")
    print(
        f"CPU native bf16 products: {native}; model.cpu_fp32_matmul={args.fp32_matmul} "
        f"(frozen bf16 linears in fp32: {args.fp32_matmul == 'on' or (args.fp32_matmul == 'auto' and not native)})",
        flush=True,
    )
    n_batches = args.steps + 1
    n_images = args.batch_size * n_batches * 4
    with tempfile.TemporaryDirectory(prefix="medcap-bench-") as tmp:
        pairs, source = phantom_pairs(Path(tmp) / "phantoms", n_images, args.seed)
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        model, processor, collator, cfg = build(
            args.model, args.cap, args.seed, args.model_path, args.fp32_matmul
        )
        build_s = time.perf_counter() - t0
        rss_model = rss_bytes()
        tok = processor.tokenizer
        lengths = [len(x) for x in tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]]
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        prefix = len(collator.prompt_ids)
        max_len = prefix + args.cap + 1
        results: dict = {
            "machine": machine_description(),
            "model": args.model_path or args.model,
            "batch_size": args.batch_size,
            "caption_cap_tokens": args.cap,
            "captions": source,
            "build_seconds": build_s,
            "rss_before_build_bytes": rss0,
            "rss_after_build_bytes": rss_model,
            "torch_threads": args.threads,
            "cpu_native_bf16": native,
            "cpu_fp32_matmul": args.fp32_matmul,
        }
        print(f"built in {build_s:.1f} s; RSS {gb(rss0)} -> {gb(rss_model)}", flush=True)

        if args.measure_peak:
            # Captions that reach the cap: the sequence length is exactly the planner's maximum.
            long_idx = [i for i, n in enumerate(lengths) if n >= args.cap]
            if len(long_idx) < args.batch_size * n_batches:
                long_idx = sorted(range(len(lengths)), key=lambda i: -lengths[i])
            batches = [long_idx[k * args.batch_size : (k + 1) * args.batch_size] for k in range(n_batches)]
            r = run_loop(
                "ours@cap", model, optimizer, lambda bp: our_step(model, collator, bp), batches, pairs
            )
            from medcap.config.run import RunConfig
            from medcap.config.train import TrainConfig

            run_cfg = RunConfig(
                model=cfg, train=TrainConfig(batch_size=args.batch_size, max_caption_tokens=args.cap)
            )
            pl = plan_lib.plan(run_cfg, "cpu", 1, args.batch_size)
            predicted = pl.memory.total
            measured = r["peak_rss_bytes"]
            err = predicted / measured - 1
            delta_measured = measured - rss_model
            delta_predicted = (
                predicted - pl.memory.weights - int(plan_lib.GPUS["cpu"].context_gib * plan_lib.GIB)
            )
            results.update(
                measure=r,
                planned_total_bytes=predicted,
                planned_seq_len=pl.seq_len_max,
                planned_weights_bytes=pl.memory.weights,
                planned_step_bytes=delta_predicted,
                measured_step_bytes=delta_measured,
                relative_error=err,
            )
            print(
                f"\npeak RSS of a bf16 LoRA step at batch {args.batch_size}, {pl.seq_len_max} tokens: measured "
                f"{gb(measured)}, planner {gb(predicted)} ({100 * err:+.1f}%)\n"
                f"  above the built model: measured {gb(delta_measured)}, planner {gb(delta_predicted)} "
                f"(activations, logits, adapters' gradients and optimizer state)"
            )
        else:
            ours_batches = epoch_batches(lengths, args.batch_size, args.seed, 0, bucket=True)[:n_batches]
            rng = random.Random(args.seed)
            order = list(range(len(pairs)))
            rng.shuffle(order)
            naive_batches = [order[k * args.batch_size : (k + 1) * args.batch_size] for k in range(n_batches)]
            pad_id = tok.pad_token_id
            naive = run_loop(
                "naive",
                model,
                optimizer,
                lambda bp: naive_step(model, collator, bp, max_len, pad_id),
                naive_batches,
                pairs,
            )
            ours = run_loop(
                "ours", model, optimizer, lambda bp: our_step(model, collator, bp), ours_batches, pairs
            )
            ratio = ours["samples_per_s"] / naive["samples_per_s"]
            results.update(naive=naive, ours=ours, speedup=ratio)
            loops = [naive, ours]
            if not args.no_cache_loop:
                from medcap.train import query_cache as features

                step, per_image = cached_step_fn(model, collator, pairs, ours_batches)
                freed = features.strip_vision(model)  # what the cached path never needs in memory
                cached = run_loop("ours+cache", model, optimizer, step, ours_batches, pairs, load=False)
                cached["cache_build_s_per_image"] = per_image
                cached["vision_bytes_freed"] = freed
                loops.append(cached)
                results.update(cached=cached, speedup_cached=cached["samples_per_s"] / naive["samples_per_s"])
            print(f"\n{'loop':<12}{'samples/s':>12}{'s/step':>10}{'tokens/step':>13}{'peak RSS':>12}")
            for r in loops:
                print(
                    f"{r['loop']:<12}{r['samples_per_s']:>12.3f}{r['seconds_per_step']:>10.2f}"
                    f"{r['padded_tokens_per_step']:>13.0f}{r['peak_rss_bytes'] / 1e9:>10.2f} GB"
                )
            print(f"ours / naive samples per second: {ratio:.2f}x  (captions: {source})")
            if "cached" in results:
                print(
                    f"ours from cached queries / naive: {results['speedup_cached']:.2f}x per epoch after the "
                    f"first (the cache cost {results['cached']['cache_build_s_per_image']:.1f} s per image once)"
                )
            if not native and args.fp32_matmul != "off":
                hidden = int(model.config.text_config.hidden_size)
                results["kernel"] = kernel_check(hidden, 64, args.threads)
            if not math.isfinite(ratio):
                return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
