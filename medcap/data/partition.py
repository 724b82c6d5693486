"""``--split 0.8,0.1,0.1 --seed N``: dividing data that comes without splits into train / valid / test.

The kept images are divided exactly by the fractions (a seeded shuffle of their IDs, the remainder
given to the largest fractional parts), so "0.8,0.1,0.1" means 80% of the usable images train. Every
other row (skipped, with its reason) goes to a split drawn with the same fractions from its ID and
the seed, so each split's accounting still holds (rows in = kept + skipped) and the same data with
the same seed always gives the same division.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

#: Split names for two or three fractions.
PART_NAMES = {2: ("train", "valid"), 3: ("train", "valid", "test")}


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` -> ``(0.8, 0.1, 0.1)``; ``ValueError`` unless 2 or 3 non-negative numbers
    summing to 1 (with the first positive)."""
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"--split: expected 2 or 3 comma-separated fractions like 0.8,0.1,0.1, got {text!r}"
        ) from None
    if len(parts) not in PART_NAMES or any(not math.isfinite(p) or p < 0 for p in parts) or parts[0] <= 0:
        raise ValueError(
            f"--split: expected 2 (train,valid) or 3 (train,valid,test) non-negative fractions, got {text!r}"
        )
    if abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"--split: the fractions must sum to 1, {text!r} sums to {sum(parts):g}")
    return parts


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_parts(
    kept_ids: Sequence[str], other_ids: Iterable[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Map every ID to its split name (``PART_NAMES``): kept IDs exactly by the fractions, the others
    by a draw seeded with ``seed`` and the ID."""
    names = PART_NAMES[len(fractions)]
    order = sorted(set(kept_ids))
    random.Random(seed).shuffle(order)
    assigned: dict[str, str] = {}
    pos = 0
    for name, count in zip(names, _counts(len(order), fractions), strict=True):
        for image_id in order[pos : pos + count]:
            assigned[image_id] = name
        pos += count
    bounds = [sum(fractions[: i + 1]) for i in range(len(fractions))]
    for image_id in other_ids:
        if image_id not in assigned:
            draw = random.Random(f"{seed}:{image_id}").random()
            assigned[image_id] = names[next((i for i, b in enumerate(bounds) if draw < b), len(names) - 1)]
    return assigned
