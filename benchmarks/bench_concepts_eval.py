"""``medcap evaluate --task concepts`` on 10,000 images, against the evaluator's own way of scoring.

    .venv/bin/python benchmarks/bench_concepts_eval.py [--images 10000] [--bootstrap 1000] [--json FILE]

Ground truth: the real ROCOv2 validation concepts (9,904 images, ``../shared/data/rocov2-valid``),
repeated under new IDs up to ``--images``; the manual concepts the same way. Predictions: the truth
perturbed (concepts dropped and added, case changed), written as a submission. Timed, in one run:

* medcap: ``evaluate_concepts`` end to end (reading both files, checking the submission as the
  evaluator does, primary and secondary scores, ``--bootstrap`` resamples for each interval, and
  writing metrics.json, per_image.csv and per_concept.csv);
* baseline: the 2025 evaluator's own computation (``csv`` reading, then scikit-learn's
  ``f1_score(average="binary")`` over the sorted union, image by image, for both scores), written
  out here; no intervals and no output files.

Prints both times (wall; medcap's also in CPU time, which other jobs on a shared machine do not
inflate), the ratio, and checks that both give the same scores (1e-9).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from benchdata import REPO, machine_description

VALID = REPO.parent / "shared" / "data" / "rocov2-valid"


def _load(path: Path) -> dict[str, tuple[str, ...]]:
    out = {}
    with path.open(encoding="utf-8") as f:
        for row in csv.reader(f):
            if "ID" not in row[0]:
                out[row[0]] = tuple(c.strip() for c in row[1].split(";")) if len(row) > 1 else ()
    return out


def _grow(rows: dict[str, tuple[str, ...]], n: int) -> dict[str, tuple[str, ...]]:
    items = list(rows.items())
    return {
        f"{k}_{i // len(items)}" if i >= len(items) else k: v
        for i, (k, v) in ((i, items[i % len(items)]) for i in range(n))
    }


def _write(path: Path, rows: dict[str, tuple[str, ...]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "CUIs"])
        for k, v in rows.items():
            w.writerow([k, ";".join(v)] if v else [k])
    return path


def official_scores(sub: Path, truth: Path, manual: Path, allowed: frozenset[str]) -> tuple[float, float]:
    """The evaluator's computation, image by image with scikit-learn (no checks beyond parsing)."""
    from sklearn.metrics import f1_score

    gt, gt2, preds = _load(truth), _load(manual), _load(sub)
    out = []
    for reference, keep in ((gt, None), (gt2, allowed)):
        max_score, score = len(reference), 0.0
        for image_id, pred in preds.items():
            p = tuple(c.upper() for c in pred)
            g = tuple(c.upper() for c in reference[image_id])
            if keep is not None:
                p, g = tuple(c for c in p if c in keep), tuple(c for c in g if c in keep)
            if not g:
                max_score -= 1
                continue
            union = sorted(set(g + p))
            score += f1_score([int(c in g) for c in union], [int(c in p) for c in union], average="binary")
        out.append(score / max_score)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from medcap.eval.concepts import MANUAL_CUIS, evaluate_concepts

    if not (VALID / "valid_concepts.csv").is_file():
        print(f"the real validation concepts are not in {VALID}", file=sys.stderr)
        return 2
    truth = _grow(_load(VALID / "valid_concepts.csv"), args.images)
    manual = _grow(_load(VALID / "valid_concepts_manual.csv"), args.images)
    rng = random.Random(0)
    pool = sorted({c for v in truth.values() for c in v})
    preds = {}
    for k, v in truth.items():
        kept = [c for c in v if rng.random() < 0.7] + rng.sample(pool, rng.randint(0, 3))
        preds[k] = tuple(dict.fromkeys(c.lower() if rng.random() < 0.1 else c for c in kept))
    with tempfile.TemporaryDirectory(prefix="medcap-bench-concepts-") as tmp:
        tmp = Path(tmp)
        t_file = _write(tmp / "test_concepts.csv", truth)
        m_file = _write(tmp / "test_concepts_manual.csv", manual)
        s_file = _write(tmp / "submission.csv", preds)
        times, cpu = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            summary = evaluate_concepts(s_file, t_file, tmp / "eval", bootstrap=args.bootstrap)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        ours = min(times)
        t0 = time.perf_counter()
        primary, secondary = official_scores(s_file, t_file, m_file, MANUAL_CUIS)
        baseline = time.perf_counter() - t0
    diff = max(
        abs(summary["metrics"]["f1"]["mean"] - primary),
        abs(summary["metrics"]["f1_manual"]["mean"] - secondary),
    )
    result = {
        "machine": machine_description(),
        "load_average_at_end": os.getloadavg(),
        "images": args.images,
        "bootstrap": args.bootstrap,
        "medcap_s_best_of_3": ours,
        "medcap_s_all": times,
        "medcap_cpu_s_all": cpu,
        "baseline_evaluator_sklearn_s": baseline,
        "speedup": baseline / ours,
        "f1": summary["metrics"]["f1"]["mean"],
        "f1_manual": summary["metrics"]["f1_manual"]["mean"],
        "max_abs_difference": diff,
    }
    print(
        f"{args.images} images: medcap evaluate --task concepts {ours:.3f} s wall, {min(cpu):.3f} s CPU (best of 3, "
        f"with {args.bootstrap} "
        f"bootstrap resamples per score and the output files); the evaluator's per-image scikit-learn loop "
        f"{baseline:.1f} s; ratio {baseline / ours:.0f}x\n"
        f"f1 {primary:.6f}, f1_manual {secondary:.6f}; largest difference {diff:.1e}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if diff < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
