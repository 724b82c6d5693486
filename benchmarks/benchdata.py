"""Shared pieces of the benchmarks: phantom images paired with REAL ROCOv2 caption lengths, and
process memory readings (Linux /proc).

Phantom captions are short and regular; ROCOv2 captions are not (median 17-18 words, a long tail).
The speed and padding of a training step depend on the caption lengths, so the benchmarks pair
phantom images with captions drawn from the real ROCOv2 validation captions shipped beside the repo
(``../shared/data/rocov2-valid/valid_captions.csv``), falling back to the phantom captions (with a
warning) where that file is absent.
"""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_VALID_CAPTIONS = REPO.parent / "shared" / "data" / "rocov2-valid" / "valid_captions.csv"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine_description() -> str:
    """This machine in words for a results file: CPU model, cores, RAM, vector ISA and whether it
    multiplies bf16 natively (``model.cpu_has_native_half_matmul``, what ``build_model`` decides by),
    which changes every bf16 figure on a CPU by up to ~100x."""
    from medcap.model.cpu import cpu_has_native_half_matmul

    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "native bf16 products" if cpu_has_native_half_matmul("bf16") else "no native bf16"
    return f"{model}, {os.cpu_count()} cores{mem}, {vector}, {bf16}"


def real_captions() -> list[str]:
    """The non-empty real ROCOv2 validation captions (whitespace normalised), or [] if absent."""
    if not SHARED_VALID_CAPTIONS.is_file():
        return []
    with SHARED_VALID_CAPTIONS.open(newline="", encoding="utf-8") as f:
        caps = [" ".join(r["Caption"].split()) for r in csv.DictReader(f)]
    return [c for c in caps if c]


def phantom_pairs(root: Path, n: int, seed: int = 0, size_range: tuple[int, int] = (500, 1000)):
    """``n`` (image path, caption) pairs: phantom JPEGs at ROCOv2-like sizes under ``root`` with
    captions sampled (seeded) from the real ROCOv2 caption distribution.

    Returns ``(pairs, source)`` where ``source`` says where the captions came from.
    """
    from medcap.data.phantoms import make_phantoms

    make_phantoms(root, n=n, seed=seed, size_range=size_range, splits=(1.0, 0.0, 0.0), progress=False)
    images = sorted((root / "train").glob("*.jpg"))[:n]
    if len(images) < n:
        raise RuntimeError(f"make_phantoms wrote {len(images)} training images into {root}, wanted {n}")
    pool = real_captions()
    if pool:
        rng = random.Random(seed)
        caps = [rng.choice(pool) for _ in images]
        source = f"captions sampled from {SHARED_VALID_CAPTIONS.name} (real ROCOv2 lengths)"
    else:
        with (root / "train_captions.csv").open(newline="", encoding="utf-8") as f:
            by_id = {r["ID"]: r["Caption"] for r in csv.DictReader(f)}
        caps = [by_id[p.stem] for p in images]
        source = "phantom captions (real ROCOv2 captions not found: lengths are NOT realistic)"
        print(f"warning: {SHARED_VALID_CAPTIONS} not found; using {source}", file=sys.stderr)
    return list(zip(images, caps, strict=True)), source


def _status_kb(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Resident set size now."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or the last ``reset_peak_rss``."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``); False if not allowed."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
