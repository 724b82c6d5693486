"""How fast is `medcap data prepare` against decoding every image?

Generates N JPEGs of ROCOv2-like sizes (500-1000 px a side; 40% stored with one channel, 30% grey
stored as RGB, 20% colour, 10% grey as RGB with a small coloured arrow) in a temporary folder, with
a captions CSV, then in the same run times:

* a naive loop that fully decodes each image (``Image.open(p).convert("RGB")`` and a channel check),
  in one process (the baseline the targets refer to) and in ``--workers`` processes;
* ``prepare_dataset`` with each colour policy (``--workers`` processes).

Prints images per second and the ratio to the naive loop. Targets: stored-rgb >= 20x and
true-color >= 4x the one-process naive loop.

    .venv/bin/python benchmarks/bench_prepare.py            # 5,000 images (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_prepare.py --n 500    # quick run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


def naive(paths: list[str], workers: int) -> float:
    t0 = time.perf_counter()
    if workers <= 1:
        for p in paths:
            naive_one(p)
    else:
        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(naive_one, paths, chunksize=16):
                pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    ap.add_argument("--workers", type=int, default=2, help="processes for prepare (default 2)")
    ap.add_argument("--dir", help="keep the generated images here (default: a temporary folder, deleted)")
    a = ap.parse_args(argv)

    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="medcap-bench-prepare-"))
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
        print(f"machine: {os.cpu_count()} CPUs; prepare uses {a.workers} worker processes\n")

        results: list[tuple[str, float]] = []
        t = naive(paths, 1)
        results.append(("naive full decode, 1 process", t))
        base = t
        t = naive(paths, a.workers)
        results.append((f"naive full decode, {a.workers} processes", t))
        naive_par = t
        for policy in ("stored-rgb", "true-color", "all"):
            t0 = time.perf_counter()
            st = prepare_dataset(
                root, tmp / f"prep-{policy}", color_policy=policy, workers=a.workers, progress=False
            )
            dt = time.perf_counter() - t0
            kept = st["train"]["kept"]
            results.append((f"prepare --color-policy {policy} (kept {kept})", dt))

        print(f"{'what':<48} {'images/s':>10} {'x naive(1p)':>12} {'x naive(' + str(a.workers) + 'p)':>12}")
        for name, dt in results:
            print(f"{name:<48} {n / dt:>10.1f} {base / dt:>12.1f} {naive_par / dt:>12.1f}")
        ratios = {name.split()[2]: base / dt for name, dt in results if name.startswith("prepare")}
        ok_rgb = ratios["stored-rgb"] >= 20
        ok_tc = ratios["true-color"] >= 4
        print(
            f"\ntargets (vs naive, 1 process): stored-rgb >= 20x: {'met' if ok_rgb else 'NOT met'} "
            f"({ratios['stored-rgb']:.1f}x); true-color >= 4x: {'met' if ok_tc else 'NOT met'} ({ratios['true-color']:.1f}x)"
        )
    finally:
        if not a.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
