"""``medcap train --dry-run`` of a shipped config of the image-text-to-text families at full size on
this CPU, with its peak memory next to ``medcap plan --gpu cpu``'s (the planner's validation).

    flock /tmp/medcap-fullsize.lock .venv/bin/python benchmarks/bench_fullsize_families_cpu.py \\
        --config qwen3-vl-4b-lora [--batch-size 1] [--cap 32] [--json out.json]

The dry run is the library function behind ``medcap train --config NAME --dry-run`` (random weights
of the real architecture, the dry run's CPU settings: bf16 where the config says fp16, micro-batch
``--batch-size``, one optimizer step, a validation and one generated caption). Its data: phantom
images resized to the size the planner sizes the sequence for (the largest image the config's pixel
settings let through unchanged: Qwen's pixel cap, LLaVA-NeXT's largest grid, Idefics3's longest
edge, the fixed square of the others) and captions cut at ``--cap`` tokens, so the trained sequence
is the planner's maximum. Prints wall time, the step time, peak RSS (the whole process) and the
planner's total; ``medcap.plan.recorded.RECORDED_FAMILY_PEAKS`` keeps the results the tests hold the
planner to (within 15%).

Needs up to ~20 GB of free RAM for the 7B models: run it under the flock, one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from benchdata import gb, machine_description


def planning_image(model_cfg) -> tuple[int, int]:
    from medcap.plan import meta_model

    meta, family = meta_model(model_cfg)
    return family.plan_spec(meta).geometry(model_cfg).image_size


def make_data(root: Path, size: tuple[int, int], n: int) -> Path:
    """Phantoms, prepared, their images resized to ``size`` (width, height)."""
    from PIL import Image

    from medcap.data.manifest import read_manifest
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    make_phantoms(root / "raw", n, seed=0, size_range=(128, 160), progress=False)
    prepare_dataset(root / "raw", root / "prepared", color_policy="all", progress=False)
    for split in ("train", "valid"):
        for row in read_manifest(root / "prepared" / split / "manifest.csv"):
            with Image.open(row.image) as im:
                resized = im.convert("RGB").resize(size)
            resized.save(row.image, format="JPEG", quality=95)
    return root / "prepared"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a shipped config (medcap configs)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cap", type=int, default=32, help="caption tokens (captions are cut there)")
    p.add_argument("--model", help="another model for the config (a family's tiny model: a quick check)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from medcap import plan as plan_lib
    from medcap.config.run import load_run_config
    from medcap.plan.recorded import recorded_run_config
    from medcap.train.dry_run import dry_run

    rec = {"config": args.config, "model": args.model, "batch_size": args.batch_size, "caption_cap": args.cap}
    planned_cfg = recorded_run_config(rec)
    planned = plan_lib.plan(planned_cfg, "cpu", config_name=args.config)
    size = planning_image(planned_cfg.model)
    print(
        f"{args.config}: planning image {size[0]} x {size[1]} px, sequence {planned.seq_len_max} tokens, "
        f"planner {gb(planned.memory.total)} on --gpu cpu"
    )
    with tempfile.TemporaryDirectory(prefix="medcap-bench-fullsize-") as tmp:
        prepared = make_data(Path(tmp), size, 12)
        cfg = load_run_config(args.config)
        if args.model:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=args.model))
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, prepared=prepared, num_workers=0),
            train=dataclasses.replace(
                cfg.train,
                max_caption_tokens=args.cap,
                dry_run_steps=1,
                dry_run_images=2,
                dry_run_batch_size=args.batch_size,
                grad_accum=1,
                eval_batch_size=args.batch_size,
                num_sample_captions=1,
                progress_bar=False,
                tensorboard=False,
                cpu_threads=2,
            ),
            generate=dataclasses.replace(cfg.generate, max_new_tokens=4, min_new_tokens=0, num_beams=1),
        )
        t0 = time.perf_counter()
        result = dry_run(cfg)
        wall = time.perf_counter() - t0
    peak = result["peak_memory_gb"] * 1e9
    out = {
        "config": args.config,
        "model": cfg.model.name_or_path,
        "machine": machine_description(),
        "batch_size": args.batch_size,
        "caption_cap": args.cap,
        "planning_image": list(size),
        "sequence_tokens": planned.seq_len_max,
        "dry_run_wall_s": round(wall, 1),
        "seconds_per_step": round(result["seconds_per_step"], 1),
        "peak_rss_bytes": int(peak),
        "planner_bytes": int(planned.memory.total),
        "planner_vs_measured": round(planned.memory.total / peak - 1, 4),
        "cpu_adjustments": result["cpu_adjustments"],
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
