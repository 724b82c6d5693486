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
is the planner's maximum. Prints wall time, the step time, peak RSS (VmHWM from the moment the model
is built, and the build's own peak apart), the RSS at each line the dry run prints, and the planner's
total; ``medcap.plan.recorded.RECORDED_FAMILY_PEAKS`` keeps the results the tests hold the planner
to (within 15%).

On a CPU the dry run fixes glibc's mmap threshold (``train.dry_run_mmap_threshold_mib``, 1 MiB) so its
peak RSS is what the step holds; ``--ab-allocator`` runs it twice in fresh processes, glibc's default
allocator as the baseline, and prints the ratios of peak memory and step time.

Needs up to ~24 GB of free RAM for the 7B models (the 4-bit build): run it under the flock, one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchdata import gb, machine_description, peak_rss_bytes, reset_peak_rss, rss_bytes


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


class RssTrace:
    """Where the peak happens: VmRSS sampled every ``every`` seconds in a thread, and the time of each
    line the dry run prints (model built, training, validation, done), so the peak can be put in a
    phase (build, the step, validation, generation, saving)."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.t0 = every, time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._stdout, self._stderr = sys.stdout, sys.stderr
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.build_peak: int | None = None
        self.peak_mark_reset = False

    def model_built(self) -> None:
        """Keep the peak so far (the build's) and restart the kernel's peak mark: what follows is
        the step, validation, the caption and saving, which is what the planner estimates. (A
        quantized random-weight build makes, saves and reloads a 16-bit model first, which a real
        quantizing load does not.)"""
        self.build_peak = peak_rss_bytes()
        self.peak_mark_reset = reset_peak_rss()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_bytes()))
            self._stop.wait(self.every)

    def _tee(self, stream: object) -> object:
        trace = self

        class Tee:
            def write(self, text: str) -> int:
                for line in text.splitlines():
                    if line.strip():
                        trace.lines.append((time.perf_counter() - trace.t0, line.strip()[:100]))
                    if line.startswith("model ") and " built in " in line and trace.build_peak is None:
                        trace.model_built()
                return stream.write(text)

            def flush(self) -> None:
                stream.flush()

            def __getattr__(self, name: str) -> object:
                return getattr(stream, name)

        return Tee()

    def __enter__(self) -> RssTrace:
        self._thread.start()
        sys.stdout, sys.stderr = self._tee(self._stdout), self._tee(self._stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._stdout, self._stderr
        self._stop.set()
        self._thread.join()

    def phases(self) -> list[dict]:
        """Per printed line: its time, the RSS then, and the highest RSS until the next line."""
        out = []
        marks = [(0.0, "start"), *self.lines, (float("inf"), "end")]
        for (t, line), (t_next, _) in zip(marks, marks[1:], strict=False):
            before = [r for s, r in self.samples if s <= t] or [0]
            window = [r for s, r in self.samples if t <= s < t_next] or [before[-1]]
            out.append({"t": round(t, 1), "line": line, "rss": before[-1], "max_rss_until_next": max(window)})
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a shipped config (medcap configs)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cap", type=int, default=32, help="caption tokens (captions are cut there)")
    p.add_argument("--model", help="another model for the config (a family's tiny model: a quick check)")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--mmap-threshold-mib",
        type=int,
        default=None,
        help="train.dry_run_mmap_threshold_mib (default: the config's, 1; 0: glibc's own allocator)",
    )
    p.add_argument(
        "--ab-allocator",
        action="store_true",
        help="run twice, each in a fresh process (the setting cannot be undone): glibc's default "
        "allocator, then the threshold fixed; print the peaks, step times and their ratios",
    )
    args = p.parse_args(argv)
    if args.ab_allocator:
        return ab_allocator(args)

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
                report_to=["csv"],
                cpu_threads=2,
                dry_run_mmap_threshold_mib=cfg.train.dry_run_mmap_threshold_mib
                if args.mmap_threshold_mib is None
                else args.mmap_threshold_mib,
            ),
            generate=dataclasses.replace(cfg.generate, max_new_tokens=4, min_new_tokens=0, num_beams=1),
        )
        t0 = time.perf_counter()
        with RssTrace() as trace:
            result = dry_run(cfg)
        wall = time.perf_counter() - t0
    # VmHWM in bytes (ru_maxrss is KiB): after the model was built when the kernel let the mark be
    # reset (/proc/self/clear_refs), else the whole process's.
    peak = peak_rss_bytes()
    after_build = trace.build_peak is not None and trace.peak_mark_reset
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
        "peak_rss_is": "after the build (step, validation, caption, save)"
        if after_build
        else "whole process",
        "build_peak_rss_bytes": trace.build_peak,
        "planner_bytes": int(planned.memory.total),
        "planner_vs_measured": round(planned.memory.total / peak - 1, 4),
        "mmap_threshold_mib": cfg.train.dry_run_mmap_threshold_mib,
        "cpu_adjustments": result["cpu_adjustments"],
        "rss_by_phase": trace.phases(),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


def ab_allocator(args: argparse.Namespace) -> int:
    """The same dry run under glibc's default allocator (baseline) and with the threshold fixed."""
    import subprocess

    from medcap.config.train import TrainConfig

    fixed = args.mmap_threshold_mib or TrainConfig.dry_run_mmap_threshold_mib
    runs = {}
    with tempfile.TemporaryDirectory(prefix="medcap-bench-ab-") as tmp:
        for label, mib in (("glibc default", 0), (f"fixed at {fixed} MiB", fixed)):
            out = Path(tmp) / f"{mib}.json"
            cmd = [sys.executable, __file__, "--config", args.config, "--batch-size", str(args.batch_size)]
            cmd += ["--cap", str(args.cap), "--mmap-threshold-mib", str(mib), "--json", str(out)]
            cmd += ["--model", args.model] if args.model else []
            print(f"--- {label}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
            runs[label] = json.loads(out.read_text())
    base, ours = runs["glibc default"], runs[f"fixed at {fixed} MiB"]
    summary = {
        "config": args.config,
        "model": base["model"],
        "machine": base["machine"],
        "planner_bytes": base["planner_bytes"],
        "runs": runs,
        "peak_ratio_fixed_over_default": round(ours["peak_rss_bytes"] / base["peak_rss_bytes"], 4),
        "step_time_ratio_fixed_over_default": round(ours["seconds_per_step"] / base["seconds_per_step"], 4),
    }
    for label, r in runs.items():
        print(
            f"{label:>18}: peak {gb(r['peak_rss_bytes'])} (planner {r['planner_vs_measured']:+.1%}), "
            f"{r['seconds_per_step']} s/step"
        )
    print(
        f"fixed / default: peak x{summary['peak_ratio_fixed_over_default']}, "
        f"step time x{summary['step_time_ratio_fixed_over_default']} (same model, batch, threads; one step each)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
