"""Concept training from the query cache against end to end through the vision tower, in one run.

    .venv/bin/python benchmarks/bench_concepts_train.py [--images 256] [--batch-size 32] [--epochs 2] [--json FILE]

The model: bench_features.py's mid-sized random BLIP2-OPT (the real structure at a quarter of the
width and a sixth of the depth: ViT 352 x 6 layers, Q-Former 192 x 4; fp32), on phantom JPEGs of
256-512 px with their concepts (``medcap data phantoms`` + ``prepare``). Like for like: the same
``medcap concepts train`` config (linear head, class-balanced loss, batch, steps, one torch thread,
data.num_workers 0 so decoding shows in this process's time), once with ``train.query_cache`` and
once without (the vision tower runs under no_grad on every batch). Timed: seconds per training step
(features included; validation excluded) in wall and in this process's CPU time, the ratio
(tower / cache), and the one-time cost of building the cache (``cache_query_embeddings``), with the
number of epochs after which the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_features import write_config
from benchdata import machine_description


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="phantoms (70%% train, 15%% valid, 15%% test)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    from medcap.cli.data import cmd_prepare
    from medcap.concepts.features import build_vision
    from medcap.concepts.train import fit_concepts
    from medcap.config.concepts import load_concepts_config
    from medcap.data.manifest import read_manifest
    from medcap.data.phantoms import make_phantoms
    from medcap.train.query_cache import cache_query_embeddings

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="medcap-bench-concepts-") as tmp:
        tmp = Path(tmp)
        make_phantoms(tmp / "ph", args.images, seed=0, size_range=(256, 512), progress=False)
        assert cmd_prepare([str(tmp / "ph"), "--out", str(tmp / "prep"), "--color-policy", "all"]) == 0
        model_dir = write_config(tmp / "model")

        def config(out: str, **extra: object):
            over = {
                "data.prepared": tmp / "prep",
                "data.num_workers": 0,
                "model.name_or_path": model_dir,
                "model.random_init": "true",
                "concepts.min_freq": 3,
                "train.out_dir": tmp / out,
                "train.batch_size": args.batch_size,
                "train.epochs": args.epochs,
                "train.num_workers": 0,
                "train.cpu_threads": 1,
                "train.progress_bar": "false",
                "train.report_to": "csv",
                **extra,
            }
            return load_concepts_config(None, [x for k, v in over.items() for x in (f"--{k}", str(v))])

        cfg = config("unused")
        vision, processor = build_vision(cfg.model)
        rows = {s: read_manifest(tmp / "prep" / s / "manifest.csv") for s in ("train", "valid")}
        t0, c0 = time.perf_counter(), time.process_time()
        cache_query_embeddings(vision, processor, cfg.model, rows, tmp / "cache", 16, 0, progress=False)
        build = (time.perf_counter() - t0, time.process_time() - c0)
        del vision

        results = {}
        for name, extra in (("query_cache", {"train.query_cache": tmp / "cache"}), ("vision_tower", {})):
            c0 = time.process_time()
            r = fit_concepts(config(name, **extra))
            results[name] = {
                "seconds_per_step": r["seconds_per_step"],
                "steps": r["step"],
                "wall_s": r["wall_s"],
                "cpu_s_whole_run": time.process_time() - c0,
                "best_f1": r["best_f1"],
            }
            print(f"{name}: {r['seconds_per_step']:.4f} s/step, {r['wall_s']:.1f} s in all", flush=True)
    cache, tower = results["query_cache"], results["vision_tower"]
    ratio = tower["seconds_per_step"] / cache["seconds_per_step"]
    steps_per_epoch = cache["steps"] / args.epochs
    saved_per_epoch = (tower["seconds_per_step"] - cache["seconds_per_step"]) * steps_per_epoch
    out = {
        "what": "medcap concepts train: seconds per step from the query cache vs through the vision tower "
        "(same config, one thread, decoding in-process); the cache's one-time build cost",
        "machine": machine_description(),
        "model": "random BLIP2-OPT, ViT 352x6, Q-Former 192x4, fp32 (bench_features.py SCALED)",
        "images_train": len(rows["train"]),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "cache_build_wall_s": build[0],
        "cache_build_cpu_s": build[1],
        **results,
        "ratio_tower_over_cache": ratio,
        "break_even_epochs": build[0] / saved_per_epoch if saved_per_epoch > 0 else None,
        "same_f1": abs(cache["best_f1"] - tower["best_f1"]),
    }
    print(
        f"per step: vision tower {tower['seconds_per_step']:.4f} s, query cache {cache['seconds_per_step']:.4f} s: "
        f"{ratio:.1f}x; cache built in {build[0]:.1f} s (pays for itself after "
        f"{out['break_even_epochs'] or float('nan'):.2f} epochs)"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
