"""Which PEFT method learns the captions best for its memory? Every method medcap offers, side by side
on the same tiny model, the same phantom task, the same steps and seeds (a comparison of recipes).

    .venv/bin/python benchmarks/bench_peft.py                  # the default CPU table, ~25-40 min on 2 cores
    .venv/bin/python benchmarks/bench_peft.py --quick          # a smoke run, a few minutes
    .venv/bin/python benchmarks/bench_peft.py --device cuda --model blip2-opt-6.7b   # time and memory only

How the comparison is made meaningful (the tiny demo model is trained from scratch, in full; an
adapter on a random base would only measure how well random features can be bent):

1. A "pretrained" tiny base: the tiny BLIP-2 trained in full by ``medcap.train.recipe.fit`` on phantoms
   of three modalities only (CT, MRI, X-ray: their regions head, chest, abdomen, knee), then exported
   merged (``medcap export --merge``) to a model folder. It is cached in the work folder and reused
   while its settings match.
2. The shifted task: phantoms of all five modalities (ultrasound and angiography, the neck and the
   vascular findings are new to the base; the held-out combinations of ``medcap.data.phantoms``
   stay held out). Every method adapts the SAME base on the SAME prepared split for the same number
   of optimizer steps, batch, schedule (AdamW, warmup, cosine) and targets (``lm-all+qformer-attn``:
   every language-model linear and the Q-Former's attention, so that both the words and the
   image-to-text side can move), with the seeds 0, 1, 2 (adapter init, data order, dropout).
3. Learning rates: methods differ by orders of magnitude in the rate they need (VeRA and (IA)3
   train scaling vectors only). Each method gets the best of a small grid (``--lrs``), chosen on
   seed 0 by the validation loss after ``--probe-steps`` steps; then every seed runs at that rate.
4. Measured per run: trainable parameters, the optimizer-step time (fit()'s mean, data loading
   included), the process's peak RSS (each run is a fresh process), the validation loss every
   ``--eval-every`` steps, and at the end, through the best checkpoint as ``medcap predict`` would
   load it, the accuracy of the image-only facts (modality, region, side) of the captions generated
   for the test split (``medcap.data.phantoms.fact_accuracy``). The baseline in the same run is the
   base model itself, unadapted, and full fine-tuning of the same base.

On a CPU the peak RSS is dominated by Python and torch (hundreds of MB against a sub-megabyte
adapter), so the table also gives the memory the method itself adds while training: trainable
parameters x 16 bytes (fp32 weight, gradient and AdamW's two moments). On a GPU (``--device cuda``)
the peak is torch's ``max_memory_allocated``.

``--device cuda --model blip2-opt-6.7b``: the full-size 6.7B recipe with random weights (bf16), each
method for ``--gpu-steps`` steps on 224 px phantoms: trainable parameters, step time and peak GPU
memory only (random weights learn nothing to score). LoftQ runs only there (peft computes it on
CUDA) and needs bitsandbytes on that machine.

Raw results: ``benchmarks/results/bench_peft_<device>_<tag>.json`` (every run) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchdata import REPO, machine_description

RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / ".work" / "bench_peft"

#: The adapter settings every LoRA-like method shares (the family's preset names).
TARGETS = "lm-all+qformer-attn"
COMMON = {
    "model.peft.targets": TARGETS,
    "model.peft.r": 8,
    "model.peft.alpha": 16,
    "model.peft.dropout": 0.05,
}

#: Every method of the comparison: the overrides that make it (on top of COMMON).
METHODS: dict[str, dict[str, Any]] = {
    "full fine-tune": {"model.full_finetune": "true", "model.peft.method": "none"},
    "lora": {},
    "lora + pissa": {"model.peft.init": "pissa"},
    "lora + olora": {"model.peft.init": "olora"},
    "lora + eva": {"model.peft.init": "eva"},
    "lora + corda": {"model.peft.init": "corda"},
    "lora + loftq (4-bit)": {
        "model.peft.init": "loftq",
        "model.quantization": "4bit",
        "model.peft.alpha": 8,  # LoftQ needs scaling 1 (alpha = r)
    },
    "lora+ (ratio 16)": {"train.loraplus_ratio": 16},
    "dora": {"model.peft.method": "dora"},
    "lora + norms": {"model.peft.train_norms": "true"},
    "adalora (12 -> 8)": {
        "model.peft.method": "adalora",
        "model.peft.r": 12,
        "model.peft.adalora_target_r": 8,
    },
    "vera (r 128)": {"model.peft.method": "vera", "model.peft.r": 128},
    "ia3": {"model.peft.method": "ia3"},
    "oft (blocks of 16)": {"model.peft.method": "oft", "model.peft.block_size": 16},
    "boft (blocks of 16)": {"model.peft.method": "boft", "model.peft.block_size": 16},
}

#: The learning rates each method's probe tries (full fine-tuning needs far lower ones than adapters,
#: and the vector-only methods higher ones).
ADAPTER_LRS = (3e-3, 1e-2, 3e-2)
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "full fine-tune": (1e-3, 3e-3),
    "vera (r 128)": (1e-2, 3e-2, 1e-1),
    "ia3": (1e-2, 3e-2, 1e-1),
}

#: What runs by default (dora and ia3, which medcap had before, run with --methods).
DEFAULT_METHODS = [m for m in METHODS if m not in ("dora", "ia3")]

#: Pretraining of the tiny base (what tests/train/test_learns.py found the tiny model needs).
PRETRAIN = {
    "model.name_or_path": "tiny",
    "model.full_finetune": "true",
    "model.peft.method": "none",
    "train.batch_size": 32,
    "train.lr": 2e-3,
    "train.warmup_steps": 20,
    "train.weight_decay": 0.0,
}
PRE_MODALITIES = ("ct", "mri", "xray")
FACTS = ("modality", "region", "side")


# ------------------------------------------------------------------------------------------------
# data and the pretrained base
# ------------------------------------------------------------------------------------------------


def make_task(
    work: Path, name: str, n: int, seed: int, modalities: tuple[str, ...] | None, size: int
) -> Path:
    """Phantoms written and prepared under ``work/name``; returns the prepared folder."""
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    phantoms, prepared = work / name / "phantoms", work / name / "prepared"
    summary = make_phantoms(
        phantoms,
        n,
        seed=seed,
        size_range=(size, size + 8),
        modalities=modalities,
        overwrite=True,
        progress=True,
    )
    if not summary.get("reused") or not (prepared / "test" / "manifest.csv").is_file():
        prepare_dataset(phantoms, prepared, color_policy="all", progress=True)
    return prepared


def overrides(settings: dict[str, Any]) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def pretrained_base(work: Path, args: argparse.Namespace) -> Path:
    """The tiny base trained in full on the three-modality phantoms, exported merged; cached."""
    key = {"pretrain": PRETRAIN, "steps": args.pretrain_steps, "n": args.n, "size": args.size, "version": 1}
    base, key_file = work / "base", work / "base.key.json"
    if (base / "config.json").is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        print(f"pretrained base: reusing {base}")
        return base
    prepared = make_task(work, "pretrain", args.n, 0, PRE_MODALITIES, args.size)
    print(
        f"pretrained base: full fine-tune of the tiny model, {args.pretrain_steps} steps on {PRE_MODALITIES}"
    )
    job = {
        "settings": {
            **PRETRAIN,
            **_quiet(),
            "data.prepared": prepared,
            "train.out_dir": work / "pretrain" / "run",
            "train.max_steps": args.pretrain_steps,
            "train.eval_at_epoch_end": "false",
            "train.cpu_threads": 1 if args.device == "cpu" else None,
        },
        "threads": 1,
        "fresh": True,
    }
    with _pool(1) as pool:
        pool.submit(run_training, job).result()
    from medcap.infer.export import export

    export(work / "pretrain" / "run" / "checkpoints" / "best", base, merge=True, overwrite=True)
    key_file.write_text(json.dumps(key))
    return base


def _quiet() -> dict[str, Any]:
    return {
        "data.num_workers": 0,
        "train.progress_bar": "false",
        "train.report_to": "csv",
        "train.log_every": 25,
        "train.num_sample_captions": 0,
        "generate.max_new_tokens": 40,
        "generate.batch_size": 50,
    }


# ------------------------------------------------------------------------------------------------
# one run (in a fresh process)
# ------------------------------------------------------------------------------------------------


def run_training(job: dict[str, Any]) -> dict[str, Any]:
    """fit() with ``job["settings"]``; with ``job["score"]`` the test split's image facts. Runs in its
    own process: the peak RSS is this run's."""
    import resource

    import torch

    from medcap.config.run import load_run_config
    from medcap.train.recipe import fit

    torch.set_num_threads(job["threads"])
    settings = {k: v for k, v in job["settings"].items() if v is not None}
    cfg = load_run_config(None, overrides(settings))
    if job.get("reuse") and (earlier := finished_run(cfg, settings)) is not None:
        if job.get("score"):
            earlier["facts"] = score(cfg, Path(job["phantoms"]))
        return earlier
    if cfg.train.out_dir.exists():  # this benchmark's own run folder from an earlier invocation
        shutil.rmtree(cfg.train.out_dir)
    t0 = time.perf_counter()
    result = fit(cfg)
    record: dict[str, Any] = {
        "name": job.get("name"),
        "seed": cfg.train.seed,
        "lr": cfg.train.lr,
        "steps": result["total_steps"],
        "trainable_parameters": result["trainable_parameters"],
        "seconds_per_step": result["seconds_per_step"],
        "fit_wall_s": time.perf_counter() - t0,
        "best_valid_loss": result.get("best_valid_loss"),
        "last_valid_loss": result.get("last_valid_loss"),
        "valid_curve": _valid_curve(cfg.train.out_dir),
        "peak_memory_gb": result["peak_memory_gb"],
    }
    if job.get("score"):
        record["facts"] = score(cfg, Path(job["phantoms"]))
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    record["reused"] = None
    return record


#: Settings that change what a run logs, not what it trains (``generate.*``: the scoring is redone).
NOT_MEASURED = ("train.report_to", "train.progress_bar", "train.log_every", "train.num_sample_captions")


def finished_run(cfg: Any, settings: dict[str, Any]) -> dict[str, Any] | None:
    """``--reuse``: the record of a run that an earlier invocation finished in ``cfg.train.out_dir``
    with every one of this job's settings (its config.yaml says so; settings the job does not name
    may differ, e.g. ones added to medcap since), else None. Its peak RSS was not kept: None."""
    import yaml

    from medcap.config.loader import to_dict

    run = cfg.train.out_dir
    result_file, config_file = run / "result.json", run / "config.yaml"
    if not (result_file.is_file() and config_file.is_file() and (run / "checkpoints" / "best").is_dir()):
        return None
    saved, wanted = yaml.safe_load(config_file.read_text(encoding="utf-8")), to_dict(cfg)

    def at(tree: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return KeyError
            tree = tree[part]
        return tree

    measured = [k for k in settings if k not in NOT_MEASURED and not k.startswith("generate.")]
    if any(at(saved, key) != at(wanted, key) for key in measured):
        return None
    result = json.loads(result_file.read_text(encoding="utf-8"))
    return {
        "seed": cfg.train.seed,
        "lr": cfg.train.lr,
        "steps": result["total_steps"],
        "trainable_parameters": result["trainable_parameters"],
        "seconds_per_step": result["seconds_per_step"],
        "fit_wall_s": result.get("wall_s"),
        "best_valid_loss": result.get("best_valid_loss"),
        "last_valid_loss": result.get("last_valid_loss"),
        "valid_curve": _valid_curve(run),
        "peak_memory_gb": result["peak_memory_gb"],
        "peak_rss_gb": None,
        "reused": str(run),
    }


def _valid_curve(run: Path) -> list[tuple[int, float]]:
    with (run / "log.csv").open(newline="", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == "valid"]


def score(cfg: Any, phantoms: Path, base_only: bool = False) -> dict[str, float]:
    """Caption the test split through the run's best checkpoint (``base_only``: with ``cfg.model``
    itself, unadapted) and score the image-only facts against the drawing truth."""
    import torch

    from medcap.data.images import read_image
    from medcap.data.manifest import read_manifest
    from medcap.data.phantoms import fact_accuracy, phantom_facts
    from medcap.infer.generate import caption_images

    if not base_only:
        from medcap.model.checkpoint import load_checkpoint

        model, processor, _ = load_checkpoint(cfg.train.out_dir / "checkpoints" / "best")
    else:
        from medcap.model.build import build_model

        model, processor = build_model(cfg.model, verbose=False)
    rows = read_manifest(cfg.data.manifest("test"))
    preds: dict[str, str] = {}
    with torch.no_grad():
        for i in range(0, len(rows), 50):
            chunk = rows[i : i + 50]
            captions = caption_images(model, processor, [read_image(r.image) for r in chunk], cfg.generate)
            preds.update({r.id: c for r, c in zip(chunk, captions, strict=True)})
    return fact_accuracy(preds, phantom_facts(phantoms, "test"), facts=FACTS)


def score_base(job: dict[str, Any]) -> dict[str, float]:
    """The unadapted base on the test split (the baseline of the fact accuracy)."""
    import torch

    from medcap.config.run import load_run_config

    torch.set_num_threads(job["threads"])
    cfg = load_run_config(None, overrides({k: v for k, v in job["settings"].items() if v is not None}))
    return score(cfg, Path(job["phantoms"]), base_only=True)


def _pool(workers: int) -> ProcessPoolExecutor:
    # Spawned, one run per process: a fork of a process that ran torch threads can deadlock, and the
    # peak RSS must be the run's own.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1)


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------


def method_settings(name: str, common: dict[str, Any], run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {**common, **COMMON, **METHODS[name], **_quiet(), "train.out_dir": run_dir, **extra}


def lr_grid(name: str, args: argparse.Namespace) -> tuple[float, ...]:
    """The learning rates the probe tries for ``name`` (``--lrs`` replaces every grid)."""
    return tuple(args.lrs) if args.lrs else LR_GRIDS.get(name, ADAPTER_LRS)


def runnable(name: str, device: str) -> str | None:
    """Why a method cannot run here (None: it can)."""
    settings = METHODS[name]
    if settings.get("model.peft.init") == "loftq":
        import torch

        if device != "cuda" or not torch.cuda.is_available():
            return "peft computes LoftQ on CUDA only"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed"
    return None


def cpu_common(base: Path, prepared: Path) -> dict[str, Any]:
    """The settings every CPU run shares (besides COMMON and the method's own)."""
    return {
        "data.prepared": prepared,
        "model.name_or_path": base,
        "train.batch_size": 32,
        "train.warmup_steps": 20,
        "train.weight_decay": 0.0,
        "train.cpu_threads": 1,
        "train.eval_at_epoch_end": "false",
    }


def from_records(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--from-records``: the comparison from the records an interrupted invocation appended to
    ``<work>/learning-rate-probe.jsonl`` and ``<work>/comparison.jsonl`` (same settings), and the base
    scored again; what did not finish is listed under ``skipped`` with how far it got."""
    started = time.perf_counter()
    base = pretrained_base(work, args)
    prepared = make_task(work, "task", args.n, 1, None, args.size)
    phantoms = work / "task" / "phantoms"
    common = cpu_common(base, prepared)

    def read(name: str) -> list[dict[str, Any]]:
        path = work / f"{name}.jsonl"
        return (
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            if path.is_file()
            else []
        )

    probes = {tuple(r.pop("key")): r for r in read("learning-rate-probe")}
    runs = {tuple(r.pop("key")): r for r in read("comparison")}
    names = [n for n in args.methods if runnable(n, "cpu") is None]
    skipped = {n: runnable(n, "cpu") for n in args.methods if runnable(n, "cpu") is not None}
    chosen = {}
    for n in names:
        losses = {lr: probes[(n, lr)].get("last_valid_loss") for lr in lr_grid(n, args) if (n, lr) in probes}
        finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
        if finite:
            chosen[n] = min(finite, key=finite.get)
        done = sum(1 for seed in range(args.seeds) if "error" not in runs.get((n, seed), {"error": ""}))
        if done < args.seeds:
            probe = f"; its probe chose lr {chosen[n]:g}" if n in chosen else ""
            skipped[n] = (
                f"interrupted: {done} of {args.seeds} seeds finished {args.steps} steps{probe} "
                f"(validation loss after {args.probe_steps} steps: {finite.get(chosen.get(n), math.nan):.3f})"
            )
    base_job = {
        "settings": {**common, **COMMON, "model.peft.method": "none", **_quiet()},
        "threads": 1,
        "phantoms": phantoms,
    }
    with _pool(1) as pool:
        base_facts = pool.submit(score_base, base_job).result()
    complete = {n for n in names if n not in skipped}
    return {
        "base_facts": base_facts,
        "chosen_lr": chosen,
        "probes": [{"method": n, "lr": lr, **r} for (n, lr), r in probes.items()],
        "runs": [{"method": n, **r} for (n, _), r in runs.items() if n in complete],
        "skipped": skipped,
        "from_records": True,
        "wall_s": time.perf_counter() - started,
    }


def compare_cpu(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = pretrained_base(work, args)
    prepared = make_task(work, "task", args.n, 1, None, args.size)
    phantoms = work / "task" / "phantoms"
    common = cpu_common(base, prepared)
    names = [n for n in args.methods if runnable(n, "cpu") is None]
    skipped = {n: runnable(n, "cpu") for n in args.methods if runnable(n, "cpu") is not None}
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    started = time.perf_counter()

    # 1. learning rate per method: best validation loss on seed 0 after probe_steps.
    probe_jobs = {
        (n, lr): {
            "name": n,
            "settings": method_settings(
                n,
                common,
                work / "probe" / f"{_slug(n)}-lr{lr:g}",
                **{"train.lr": lr, "train.seed": 0},
                **{"train.max_steps": args.probe_steps},
            ),
            "threads": 1,
            "reuse": args.reuse,
        }
        for n in names
        for lr in lr_grid(n, args)
    }
    probes = _run_all(probe_jobs, args.workers, "learning-rate probe")
    chosen = {}
    for n in names:
        losses = {lr: probes[(n, lr)].get("last_valid_loss") for lr in lr_grid(n, args) if (n, lr) in probes}
        finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
        chosen[n] = min(finite, key=finite.get) if finite else lr_grid(n, args)[0]
        print(
            f"  {n}: lr {chosen[n]:g} (validation loss after {args.probe_steps} steps: "
            + ", ".join(f"{lr:g} -> {v:.3f}" for lr, v in losses.items())
            + ")"
        )

    # 2. every seed at the chosen rate, with the validation curve and the fact accuracy at the end.
    base_job = {
        "settings": {**common, **COMMON, "model.peft.method": "none", **_quiet()},
        "threads": 1,
        "phantoms": phantoms,
    }
    jobs = {
        (n, seed): {
            "name": n,
            "settings": method_settings(
                n,
                common,
                work / "runs" / f"{_slug(n)}-seed{seed}",
                **{
                    "train.lr": chosen[n],
                    "train.seed": seed,
                    "train.max_steps": args.steps,
                    "train.eval_every": args.eval_every,
                },
            ),
            "threads": 1,
            "score": True,
            "phantoms": phantoms,
            "reuse": args.reuse,
        }
        for n in names
        for seed in range(args.seeds)
    }
    with _pool(1) as pool:
        base_facts = pool.submit(score_base, base_job).result()
    runs = _run_all(jobs, args.workers, "comparison")
    return {
        "base_facts": base_facts,
        "chosen_lr": chosen,
        "probes": [{"method": n, "lr": lr, **r} for (n, lr), r in probes.items()],
        "runs": [{"method": n, **r} for (n, _), r in runs.items()],
        "skipped": skipped,
        "wall_s": time.perf_counter() - started,
    }


def compare_gpu(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The full-size 6.7B recipe with random weights: trainable parameters, step time, peak memory."""
    prepared = make_task(work, "gpu-task", 64, 1, None, 224)
    tiny = args.model.startswith("tiny")  # the test's stand-in: the same code on a tiny model
    common = {
        "data.prepared": prepared,
        "model.name_or_path": args.model if tiny or "/" in args.model else f"Salesforce/{args.model}",
        "model.random_init": None if tiny else "true",
        "model.precision": "bf16",
        "model.peft.init_batches": 8,  # EVA needs enough distinct inputs for its SVDs to converge
        "train.batch_size": args.gpu_batch,
        "train.max_steps": args.gpu_steps,
        "train.lr": 1e-4,
        "train.eval_at_epoch_end": "false",
        "data.max_eval_samples": 8,
    }
    names = [n for n in args.methods if n != "full fine-tune"]
    skipped = {n: runnable(n, "cuda") for n in names if runnable(n, "cuda") is not None}
    jobs = {
        (n, 0): {"name": n, "settings": method_settings(n, common, work / "gpu" / _slug(n)), "threads": 4}
        for n in names
        if n not in skipped
    }
    started = time.perf_counter()
    runs = _run_all(jobs, 1, "full-size")
    return {
        "runs": [{"method": n, **r} for (n, _), r in runs.items()],
        "skipped": skipped,
        "wall_s": time.perf_counter() - started,
    }


def _run_all(jobs: dict[Any, dict[str, Any]], workers: int, what: str) -> dict[Any, dict[str, Any]]:
    """Every job in a pool of ``workers``; each record is also appended, as it comes, to
    ``<work>/<what>.jsonl`` beside the runs, so that an interrupted comparison keeps what it measured."""
    from medcap.config.run import load_run_config

    for job in jobs.values():  # a settings error is found here, not in every spawned run
        load_run_config(None, overrides({k: v for k, v in job["settings"].items() if v is not None}))
    out: dict[Any, dict[str, Any]] = {}
    t0 = time.perf_counter()
    first = next(iter(jobs.values()), None)
    log = Path(first["settings"]["train.out_dir"]).parent.parent / f"{_slug(what)}.jsonl" if first else None
    if log is not None:
        log.unlink(missing_ok=True)
    with _pool(workers) as pool:
        futures = {key: pool.submit(run_training, job) for key, job in jobs.items()}
        for i, (key, future) in enumerate(futures.items(), 1):
            try:
                out[key] = future.result()
            except Exception as e:  # one method failing must not lose the others; it is reported
                print(f"  FAILED {key}: {type(e).__name__}: {e}")
                out[key] = {"error": f"{type(e).__name__}: {e}"}
            if log is not None:
                with log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": list(key), **out[key]}, default=str) + "\n")
            elapsed = time.perf_counter() - t0
            print(
                f"[{what}] {i}/{len(jobs)} done ({key}), {elapsed / 60:.1f} min, "
                f"about {elapsed / i * (len(jobs) - i) / 60:.1f} min left",
                flush=True,
            )
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


# ------------------------------------------------------------------------------------------------
# summary, table, plot
# ------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in result["runs"]:
        if "error" not in r:
            by.setdefault(r["method"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, runs in by.items():
        s: dict[str, Any] = {
            "trainable_parameters": runs[0]["trainable_parameters"],
            "adapter_training_memory_mb": runs[0]["trainable_parameters"] * 16 / 1e6,
            "seconds_per_step": _stats([r["seconds_per_step"] for r in runs]),
            "peak_rss_gb": _stats(
                [r["peak_rss_gb"] for r in runs if r.get("peak_rss_gb") is not None] or [math.nan]
            ),
            "runs_reused": sum(1 for r in runs if r.get("reused")),
            "peak_memory_gb": _stats([r["peak_memory_gb"] for r in runs]),
        }
        if runs[0].get("best_valid_loss") is not None:
            s["best_valid_loss"] = _stats([r["best_valid_loss"] for r in runs])
        if "facts" in runs[0]:
            for f in (*FACTS, "all"):
                s[f] = _stats([r["facts"][f] for r in runs])
        out[name] = s
    return out


def table(result: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    def ms(x: dict[str, float], digits: int = 2) -> str:
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"

    lines = []
    if "base_facts" in result:
        full = summary.get("full fine-tune", {})
        lines += [
            "| method | lr | trainable | + training memory | s/step (ratio to LoRA) | best valid loss | "
            "modality | region | side | all three |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        b = result["base_facts"]
        lines.append(
            f"| base, unadapted | - | 0 | 0 | - | - | {b['modality']:.2f} | {b['region']:.2f} | {b['side']:.2f} | "
            f"{b['all']:.2f} |"
        )
        lora_step = summary.get("lora", {}).get("seconds_per_step", {}).get("mean")
        for name, s in summary.items():
            ratio = f" ({s['seconds_per_step']['mean'] / lora_step:.2f})" if lora_step else ""
            lines.append(
                f"| {name} | {result['chosen_lr'].get(name, float('nan')):g} | {s['trainable_parameters']:,} | "
                f"{s['adapter_training_memory_mb']:.2f} MB | {s['seconds_per_step']['mean']:.3f}{ratio} | "
                f"{ms(s['best_valid_loss'], 3)} | {ms(s['modality'])} | {ms(s['region'])} | {ms(s['side'])} | "
                f"{ms(s['all'])} |"
            )
        _ = full
    else:
        lines += ["| method | trainable | s/step | peak GPU memory (GB) |", "|---|---|---|---|"]
        for name, s in summary.items():
            lines.append(
                f"| {name} | {s['trainable_parameters']:,} | {s['seconds_per_step']['mean']:.3f} | "
                f"{s['peak_memory_gb']['mean']:.2f} |"
            )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | not run here: {why} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.5))
    ax = axes[0]
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        curves = [r["valid_curve"] for r in result["runs"] if r.get("method") == name and "valid_curve" in r]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        values = [[c[j][1] for c in curves] for j in range(len(steps))]
        mean = [statistics.fmean(v) for v in values]
        ax.plot(steps, mean, label=name, color=cmap(i % 20))
        ax.fill_between(
            steps, [min(v) for v in values], [max(v) for v in values], color=cmap(i % 20), alpha=0.15
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (mean; band: min-max over seeds)")
    ax.set_title("validation loss on the shifted task")
    ax.legend(fontsize=7)
    ax = axes[1]
    x = range(len(names))
    width = 0.27
    for k, fact in enumerate(FACTS):
        ax.bar(
            [i + (k - 1) * width for i in x],
            [summary[n][fact]["mean"] for n in names],
            width,
            yerr=[summary[n][fact]["std"] for n in names],
            capsize=2,
            label=fact,
        )
    base = result["base_facts"]
    for k, fact in enumerate(FACTS):
        ax.axhline(base[fact], color=f"C{k}", linestyle=":", linewidth=1)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("test-split fact accuracy (mean ± std over seeds; dotted: the base)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for i, name in enumerate(names):
        s = summary[name]
        ax.errorbar(
            s["trainable_parameters"],
            s["all"]["mean"],
            yerr=s["all"]["std"],
            fmt="o",
            color=cmap(i % 20),
            capsize=3,
        )
        ax.annotate(
            name,
            (s["trainable_parameters"], s["all"]["mean"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("share of test images with modality, region and side right")
    ax.set_title("what each adapter buys for its size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="tiny", help="tiny (the comparison) or blip2-opt-6.7b (--device cuda)")
    p.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, help=f"'all' or a subset of: {', '.join(METHODS)}"
    )
    p.add_argument("--n", type=int, default=800, help="phantoms per dataset (70/15/15 train/valid/test)")
    p.add_argument("--size", type=int, default=64, help="phantom side in pixels")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=200, help="adaptation steps of every method")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--lrs", type=float, nargs="+", help="one learning-rate grid for every method (default: LR_GRIDS)"
    )
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2, help="runs side by side (one torch thread each)")
    p.add_argument("--gpu-steps", type=int, default=10)
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 methods, few steps, 2 seeds")
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument(
        "--from-records",
        action="store_true",
        help="no runs: the table from the records an interrupted invocation with the same settings left in "
        "the work folder (unfinished methods listed as such), the base scored again",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs that an earlier invocation finished with the same settings (scored again; their "
        "peak RSS is not known). Without it every run starts afresh",
    )
    p.add_argument("--work", type=Path, default=WORK, help="cache of the phantoms, the base and the runs")
    args = p.parse_args(argv)
    if args.methods == ["all"]:
        args.methods = list(METHODS)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if args.quick:
        args.methods = [
            m for m in args.methods if m in ("lora", "lora + pissa", "vera (r 128)", "adalora (12 -> 8)")
        ]
        args.n, args.pretrain_steps, args.steps, args.eval_every = 300, 150, 60, 20
        args.seeds, args.lrs, args.probe_steps = 2, [1e-2], 20
        args.tag = args.tag or "quick"
    if args.device == "cuda" and args.model == "tiny":
        p.error(
            "--device cuda measures the full-size recipe: pass --model blip2-opt-6.7b (or another shipped one)"
        )
    work = args.work / ("gpu" if args.device == "cuda" else "cpu")
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    print(f"bench_peft on {machine}")
    if args.device == "cuda":
        result = compare_gpu(args, work)
    else:
        result = from_records(args, work) if args.from_records else compare_cpu(args, work)
    result["load_average_at_end"] = os.getloadavg()
    summary = summarize(result)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {
        "machine": machine,
        "settings": settings,
        "common": COMMON,
        "methods": METHODS,
        **result,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_peft_{args.device}" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    print(table(result, summary))
    if args.device == "cpu" and summary:
        plot(result, summary, RESULTS / f"{stem}.png")
        print(f"plot: {RESULTS / f'{stem}.png'}")
    print(f"raw results: {RESULTS / f'{stem}.json'} ({result['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned runs before torch starts
    sys.exit(main())
