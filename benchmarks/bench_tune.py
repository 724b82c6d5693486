"""Trials per hour of ``medcap tune`` on the demo space, with and without pruning, in the same run.

    python benchmarks/bench_tune.py [--phantoms 400] [--trials 8] [--steps 100] [--pruner shipped|halving]
        [--json benchmarks/results/bench_tune_cpu.json]

Makes phantoms with medcap's own code (``make_phantoms`` + ``prepare_dataset``), then runs the shipped
demo space (``medcap/config/recipes/spaces/demo.yaml``: the tiny BLIP-2 trained from scratch, judged
by BERTScore with the packaged MiniLM on 24 validation phantoms every 20 steps) twice, same seed, same
trials, same machine, one after the other:

1. the baseline: no pruning (``pruner.kind: none``), every trial trains all its steps;
2. with pruning: the space's own pruner (``--pruner shipped``), or successive halving.

Prints and writes, for each: wall time, trials per hour, optimizer steps trained in all, trials
pruned, the best BERTScore and its noise (standard error over the 24 validation images of the best
trial's best validation, from its samples.jsonl: ``train.num_sample_captions`` is set to the subset
size, which costs nothing since those captions are generated anyway). The goal (issue 14): pruning
cuts the wall time at least 2x for the same best figure within noise (|difference| <= 2 standard
errors of the two figures combined). Exit code 1 when it is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdata import machine_description  # noqa: E402

from medcap.tune.space import PrunerSettings, load_space  # noqa: E402
from medcap.tune.study import tune  # noqa: E402


def make_data(root: Path, n: int) -> Path:
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    make_phantoms(root / "phantoms", n, seed=0, progress=False)
    prepare_dataset(root / "phantoms", root / "prepared", color_policy="all", workers=1, progress=False)
    return root / "prepared"


def _steps_and_noise(study_dir: Path, best_run: str | None) -> tuple[int, float | None]:
    """Optimizer steps trained over all trials (from their log.csv), and the standard error of the
    best trial's best validation figure over its images (from its samples.jsonl)."""
    import csv

    steps = 0
    for log in (study_dir / "trials").glob("*/log.csv"):
        with log.open(newline="") as f:
            train_steps = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "train"]
        steps += max(train_steps, default=0)
    if best_run is None:
        return steps, None
    by_step: dict[int, list[float]] = {}
    for line in (Path(best_run) / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)  # one sample caption a line, with its step and score
        if record.get("score") is not None:
            by_step.setdefault(int(record["step"]), []).append(float(record["score"]))
    scored = [v for v in by_step.values() if len(v) > 1]
    if not scored:
        return steps, None
    best = max(scored, key=statistics.fmean)
    return steps, statistics.stdev(best) / math.sqrt(len(best))


def run_study(space, folder: Path, label: str) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    result = tune(space, folder, progress=False)
    wall = time.perf_counter() - t0
    steps, noise = _steps_and_noise(folder, result.best_run)
    row = {
        "label": label,
        "pruner": dataclasses.asdict(space.pruner),
        "trials": result.counted,
        "complete": result.complete,
        "pruned": result.pruned,
        "failed": result.failed,
        "wall_s": round(wall, 1),
        "trials_per_hour": round(result.counted / wall * 3600, 1),
        "steps_trained": steps,
        "best_value": result.best_value,
        "best_noise_se": noise,
        "best_params": result.best_params,
        "report": str(result.report) if result.report else None,
    }
    print(
        f"{label:<12} {row['wall_s']:8.1f} s  {row['trials_per_hour']:7.1f} trials/h  "
        f"{steps:5d} steps  {result.pruned} pruned  best {result.best_value} (SE {noise})",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phantoms", type=int, default=400, help="phantoms to make (70%% train, 15%% valid)")
    p.add_argument("--trials", type=int, default=8, help="trials per study (the demo space has 8)")
    p.add_argument("--steps", type=int, help="train.max_steps of every trial (default: the space's)")
    p.add_argument(
        "--pruner",
        choices=("shipped", "halving", "median"),
        default="shipped",
        help="the pruned study's pruner: the space's own, successive halving, or median",
    )
    p.add_argument("--workdir", type=Path, help="keep the studies here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the raw result here")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tune_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_description()}", flush=True)
    t0 = time.perf_counter()
    prepared = make_data(work, args.phantoms)
    print(f"{args.phantoms} phantoms made and prepared in {time.perf_counter() - t0:.1f} s", flush=True)

    space = load_space("demo")
    overrides = dict(space.overrides)
    overrides["data.prepared"] = str(prepared)
    # Every captioned validation image's score goes to samples.jsonl (the noise of the best figure).
    overrides["train.num_sample_captions"] = overrides.get("train.select_subset", 24)
    if args.steps:
        overrides["train.max_steps"] = args.steps
    space = dataclasses.replace(space, overrides=overrides, trials=args.trials)
    pruned_with = space.pruner
    if args.pruner != "shipped":
        pruned_with = dataclasses.replace(space.pruner, kind=args.pruner)

    baseline = run_study(
        dataclasses.replace(space, pruner=PrunerSettings(kind="none")), work / "no-pruning", "no pruning"
    )
    pruned = run_study(dataclasses.replace(space, pruner=pruned_with), work / "pruning", "pruning")

    speedup = baseline["wall_s"] / pruned["wall_s"]
    gap = None
    within = None
    if baseline["best_value"] is not None and pruned["best_value"] is not None:
        gap = pruned["best_value"] - baseline["best_value"]
        se = math.hypot(baseline["best_noise_se"] or 0.0, pruned["best_noise_se"] or 0.0)
        within = gap >= 0 or abs(gap) <= 2 * se
    ok = speedup >= 2.0 and bool(within)
    print(
        f"pruning: wall time / {speedup:.2f} (goal >= 2), best figure {gap:+.4f} vs no pruning "
        f"({'within' if within else 'OUTSIDE'} 2 standard errors) -> {'OK' if ok else 'MISSED'}"
    )
    out = {
        "machine": machine_description(),
        "space": str(space.source),
        "phantoms": args.phantoms,
        "trials": args.trials,
        "max_steps": overrides.get("train.max_steps"),
        "baseline": baseline,
        "pruning": pruned,
        "wall_time_ratio": round(speedup, 2),
        "best_gap": gap,
        "within_noise": within,
        "goal_met": ok,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n", encoding="utf-8")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
