"""Does the auxiliary concept head (``train.concept_loss_weight``) help a caption model state the
image-only facts? A comparison of two recipes on phantoms, labelled as one (not a speed figure).

    .venv/bin/python benchmarks/bench_concept_aux.py [--weight 1.0] [--steps 750] [--json FILE]

Both runs are tests/train/test_learns.py's recipe (the tiny BLIP-2 trained from scratch, every
parameter, on 1,000 phantoms, batch 32, AdamW 2e-3, one torch thread each, side by side in two
processes), the same seed and data; one adds the auxiliary concept loss with ``--weight``. The
held-out test captions are parsed back into facts; reported: the hit rate of each fact, and of the
lesion side where only the image tells it (``side_from_image``), for both runs and their difference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchdata import REPO, machine_description

sys.path.insert(0, str(REPO))


def _run(root: str, overrides: dict) -> dict:
    from tests.train.test_learns import train_and_score

    t0 = time.perf_counter()
    scores = train_and_score(root, False, overrides)
    scores["wall_s"] = time.perf_counter() - t0
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=750)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    context = multiprocessing.get_context("spawn")
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    common = {"train.max_steps": args.steps, "train.concept_min_freq": 5}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(2, mp_context=context) as pool:
        runs = {
            "caption_only": pool.submit(_run, f"{tmp}/plain", {**common, "train.concept_loss_weight": 0.0}),
            "with_concept_head": pool.submit(
                _run, f"{tmp}/aux", {**common, "train.concept_loss_weight": args.weight}
            ),
        }
        result = {k: v.result() for k, v in runs.items()}
    facts = [k for k in result["caption_only"] if k not in ("wall_s", "side_from_image_n")]
    out = {
        "what": "comparison of two recipes on phantoms (not a speed figure): caption loss only vs caption "
        f"loss + {args.weight} x auxiliary concept loss; held-out test-split fact hit rates",
        "machine": machine_description(),
        "steps": args.steps,
        "weight": args.weight,
        **result,
        "difference": {f: result["with_concept_head"][f] - result["caption_only"][f] for f in facts},
    }
    for f in facts:
        a, b = result["caption_only"][f], result["with_concept_head"][f]
        print(f"{f:16s} caption only {a:.3f}   with concept head {b:.3f}   difference {b - a:+.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
