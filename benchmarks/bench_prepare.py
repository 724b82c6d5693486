"""How fast is `medcap data prepare` against decoding every image, at equal worker counts?

Generates N JPEGs of ROCOv2-like sizes (500-1000 px a side; 40% stored with one channel, 30% grey
stored as RGB, 20% colour, 10% grey as RGB with a small coloured arrow) in a temporary folder, with
a captions CSV, then in the same run times, for 1 process and for ``--workers`` processes:

* the baseline: a naive loop that fully decodes each image (``Image.open(p).convert("RGB")`` and a
  channel check) in that many processes;
* ``prepare_dataset`` with each colour policy, in the same number of worker processes.

Prints images per second and the ratio of prepare to the naive loop AT THE SAME WORKER COUNT (a
ratio across worker counts mixes in the parallelism). With ``--repeats N`` every timing is taken N
times, interleaved; a ratio is taken within each repeat (the baseline and prepare timed moments
apart, under the same load) and the median over repeats is reported, with the range (the machine
may be shared: the load average before and after is recorded). The same ratio in CPU time (this
process and its ended pool workers) is printed beside it: other jobs on a shared machine inflate
wall time, not CPU time. Targets:
stored-rgb >= 20x and true-color >= 4x the naive loop with the same processes. ``--json`` writes
everything (machine, load, every timing, the ratios) for benchmarks/results/.

    .venv/bin/python benchmarks/bench_prepare.py                      # 5,000 images (minutes on 2 cores)
    .venv/bin/python benchmarks/bench_prepare.py --n 1000 --repeats 3 --json benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchdata import machine_description
from PIL import Image, ImageDraw

from medcap.data.prepare import prepare_dataset

# Grain calibrated so that files average about 75 KB, like the real release (about 6 GB for
# 79,789 JPEGs); decode cost grows with the compressed size, so this matters for the ratios.
NOISE_SIGMA = 2.0
KINDS = ["L"] * 4 + ["grey-rgb"] * 3 + ["color"] * 2 + ["arrow"]


_NOISE: np.ndarray | None = None


def _noise() -> np.ndarray:
    """One film-grain field per process; each picture takes a random crop (fast to generate)."""
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(12345).normal(0, NOISE_SIGMA, (1200, 1200)).astype(np.float32)
    return _NOISE


def _picture(seed: int) -> tuple[Image.Image, str]:
    """A radiograph-like picture: low-frequency anatomy, a few structures, film-grain noise."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(500, 1001, size=2))
    xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    a = np.full((h, w), 90.0, np.float32)
    for _ in range(4):  # cos(fx x + fy y + ph), built from outer products (separable, cheap)
        fx, fy, ph, amp = (
            rng.uniform(0.002, 0.02),
            rng.uniform(0.002, 0.02),
            rng.uniform(0, 6.3),
            rng.uniform(10, 40),
        )
        cx, sx = np.cos(fx * xs + ph), np.sin(fx * xs + ph)
        a += amp * (np.outer(np.cos(fy * ys), cx) - np.outer(np.sin(fy * ys), sx))
    for _ in range(int(rng.integers(2, 6))):  # round structures, drawn in their bounding box only
        cx, cy, r = int(rng.uniform(0, w)), int(rng.uniform(0, h)), int(rng.uniform(20, 150))
        x0, x1, y0, y1 = max(0, cx - r), min(w, cx + r), max(0, cy - r), min(h, cy + r)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        a[y0:y1, x0:x1] += rng.uniform(-60, 80) * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)
    ox, oy = (int(v) for v in rng.integers(0, 200, size=2))
    a += _noise()[oy : oy + h, ox : ox + w]
    g = a.clip(0, 255).astype(np.uint8)
    kind = KINDS[seed % len(KINDS)]
    if kind == "L":
        return Image.fromarray(g, "L"), kind
    if kind == "color":
        tint = np.stack([g, (g * 0.6).astype(np.uint8), (255 - g)], axis=-1)
        return Image.fromarray(tint, "RGB"), kind
    im = Image.fromarray(g, "L").convert("RGB")
    if kind == "arrow":
        x0, y0 = int(rng.uniform(50, w - 100)), int(rng.uniform(50, h - 100))
        ImageDraw.Draw(im).line([(x0, y0), (x0 + 40, y0 + 30)], fill=(20, 80, 255), width=4)
    return im, kind


def _write(args: tuple[int, str]) -> None:
    seed, folder = args
    im, _ = _picture(seed)
    im.save(os.path.join(folder, f"BENCH_{seed:06d}.jpg"), "JPEG", quality=90)


def generate(root: Path, n: int, workers: int) -> float:
    """Write n images into root/train and root/train_captions.csv; returns megabytes written."""
    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(folder)) for i in range(n)]
    with multiprocessing.get_context().Pool(workers) as pool:
        for _ in pool.imap_unordered(_write, jobs, chunksize=16):
            pass
    with (root / "train_captions.csv").open("w", encoding="utf-8") as f:
        f.write("ID,Caption\n")
        for i in range(n):
            f.write(f"BENCH_{i:06d},Synthetic radiograph number {i} showing a round opacity.\n")
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


def naive_one(path: str) -> bool:
    """The baseline: decode at full size, then look at the channels."""
    a = np.asarray(Image.open(path).convert("RGB"))
    return bool((a[..., 0] != a[..., 1]).any() or (a[..., 1] != a[..., 2]).any())


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended (pool workers):
    unlike wall time, other jobs on a shared machine do not inflate it."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def naive(paths: list[str], workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the baseline."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    if workers <= 1:
        for p in paths:
            naive_one(p)
    else:
        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(naive_one, paths, chunksize=16):
                pass
    return time.perf_counter() - t0, cpu_seconds() - c0


POLICIES = ("stored-rgb", "true-color", "all")
TARGETS = {"stored-rgb": 20.0, "true-color": 4.0}


def time_prepare(root: Path, out: Path, policy: str, workers: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds) of one ``prepare_dataset`` run into a fresh folder, and the
    images it kept."""
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    st = prepare_dataset(root, out, color_policy=policy, workers=workers, progress=False)
    return time.perf_counter() - t0, cpu_seconds() - c0, st["train"]["kept"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the parallel runs (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per timing; the median is reported")
    ap.add_argument("--dir", help="keep the generated images here (default: a temporary folder, deleted)")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)

    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="medcap-bench-prepare-"))
    result: dict = {"machine": machine_description(), "load_average_before": os.getloadavg()}
    try:
        root = tmp / "data"
        if not (root / "train_captions.csv").is_file():
            t0 = time.perf_counter()
            mb = generate(root, a.n, a.workers)
            print(
                f"generated {a.n} JPEGs ({mb:.0f} MB, {mb * 1e3 / a.n:.0f} KB on average, 500-1000 px a side) "
                f"in {time.perf_counter() - t0:.1f} s"
            )
        paths = sorted(str(p) for p in (root / "train").iterdir())[: a.n]
        n = len(paths)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"machine: {result['machine']}; load average {result['load_average_before'][0]:.2f}")
        counts = sorted({1, a.workers})
        timings: dict[str, dict[str, list[float]]] = {}
        kept: dict[str, int] = {}
        for _ in range(a.repeats):  # interleaved, so a burst of load on a shared box hits every row alike
            for w in counts:
                wall, cpu = naive(paths, w)
                timings.setdefault(f"naive/{w}", {"seconds": [], "cpu_seconds": []})
                timings[f"naive/{w}"]["seconds"].append(wall)
                timings[f"naive/{w}"]["cpu_seconds"].append(cpu)
                for policy in POLICIES:
                    wall, cpu, kept[policy] = time_prepare(root, tmp / f"prep-{policy}-{w}", policy, w)
                    timings.setdefault(f"{policy}/{w}", {"seconds": [], "cpu_seconds": []})
                    timings[f"{policy}/{w}"]["seconds"].append(wall)
                    timings[f"{policy}/{w}"]["cpu_seconds"].append(cpu)
        median = {key: statistics.median(t["seconds"]) for key, t in timings.items()}

        print(
            f"\n{n} images, {mb:.0f} MB; {a.repeats} repeat(s): median images/s (wall); ratio = naive / prepare "
            "with the same processes, per repeat, median (range), in wall time and in CPU time"
        )
        print(
            f"{'what':<44} {'processes':>9} {'images/s':>10} {'x naive':>9} {'range':>11} {'x naive CPU':>12}"
        )
        ratios: dict[str, dict[str, float]] = {}
        ranges: dict[str, dict[str, list[float]]] = {}
        cpu_ratios: dict[str, dict[str, float]] = {}
        for w in counts:
            base, base_cpu = timings[f"naive/{w}"]["seconds"], timings[f"naive/{w}"]["cpu_seconds"]
            print(
                f"{'naive full decode (baseline)':<44} {w:>9} {n / median[f'naive/{w}']:>10.1f} {1.0:>9.1f}"
            )
            for policy in POLICIES:
                t = timings[f"{policy}/{w}"]
                per_repeat = [b / x for b, x in zip(base, t["seconds"], strict=True)]
                per_repeat_cpu = [b / x for b, x in zip(base_cpu, t["cpu_seconds"], strict=True)]
                ratios.setdefault(policy, {})[str(w)] = statistics.median(per_repeat)
                ranges.setdefault(policy, {})[str(w)] = [min(per_repeat), max(per_repeat)]
                cpu_ratios.setdefault(policy, {})[str(w)] = statistics.median(per_repeat_cpu)
                name = f"prepare --color-policy {policy} (kept {kept[policy]})"
                spread = f"{min(per_repeat):.1f}-{max(per_repeat):.1f}"
                print(
                    f"{name:<44} {w:>9} {n / median[f'{policy}/{w}']:>10.1f} "
                    f"{statistics.median(per_repeat):>9.1f} {spread:>11} {statistics.median(per_repeat_cpu):>12.1f}"
                )
        verdicts = []
        for policy, target in TARGETS.items():
            for w in counts:
                r = ratios[policy][str(w)]
                verdicts.append(
                    f"{policy} >= {target:.0f}x with {w} process(es): {'met' if r >= target else 'NOT met'} ({r:.1f}x)"
                )
        print(
            "\ntargets (prepare vs the naive full decode, same number of processes):\n  "
            + "\n  ".join(verdicts)
        )
        result.update(
            images=n,
            megabytes=mb,
            repeats=a.repeats,
            worker_counts=counts,
            seconds=timings,
            median_seconds=median,
            images_per_s={key: n / dt for key, dt in median.items()},
            kept=kept,
            ratio_vs_naive_same_processes=ratios,
            ratio_range_over_repeats=ranges,
            cpu_time_ratio_vs_naive_same_processes=cpu_ratios,
            targets=verdicts,
            load_average_after=os.getloadavg(),
        )
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
            print(f"wrote {a.json}")
    finally:
        if not a.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
