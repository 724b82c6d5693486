"""What choosing checkpoints by BERTScore (``train.select_by``) costs on the demo, by subset size.

    python benchmarks/bench_select.py [--phantoms 300] [--steps 66] [--every 22] [--subsets 8,24,64]
        [--json benchmarks/results/bench_select_cpu.json]

Makes phantoms with medcap's own code, then trains the shipped demo recipe (the tiny BLIP-2 from
scratch, batch 32) for ``--steps`` optimizer steps with a validation every ``--every`` steps (the
demo validates once an epoch: 22 steps on its 700 training phantoms), in this process, one after
the other:

1. the baseline: ``train.select_by loss`` (validation loss, and the demo's 3 sample captions);
2. ``train.select_by bertscore`` (the packaged MiniLM, offline) with ``train.select_subset`` N for
   each N of ``--subsets``: at every validation N captions are generated and scored.

For each run: the wall time of ``fit()``, and the seconds spent in ``validation_figures`` (captioning
and scoring: what selection by a metric adds; timed around medcap's own function). The overhead is
reported two ways: the selection seconds as a share of the rest of the run, and the wall time over
the baseline's. Goal (issue 14): find the subset size that keeps the overhead under 10%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdata import machine_description  # noqa: E402

import medcap.train.recipe as recipe  # noqa: E402
from medcap.config.run import load_run_config  # noqa: E402


def make_data(root: Path, n: int) -> Path:
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    make_phantoms(root / "phantoms", n, seed=0, progress=False)
    prepare_dataset(root / "phantoms", root / "prepared", color_policy="all", workers=1, progress=False)
    return root / "prepared"


class Timed:
    """Seconds spent in ``recipe.validation_figures`` (the captions and their scores)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = recipe.validation_figures

    def __call__(self, run):  # noqa: ANN001, ANN204
        t0 = time.perf_counter()
        try:
            return self._inner(run)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def one_run(prepared: Path, out: Path, steps: int, every: int, select: dict[str, object]) -> dict:
    overrides = {
        "data.prepared": prepared,
        "train.out_dir": out,
        "train.max_steps": steps,
        "train.eval_every": every,
        "train.eval_at_epoch_end": "false",
        "train.patience": "null",
        "train.progress_bar": "false",
        "train.report_to": "csv",
        **select,
    }
    argv: list[str] = []
    for k, v in overrides.items():
        argv += [f"--{k}", str(v)]
    cfg = load_run_config("demo", argv)
    timer = Timed()
    recipe.validation_figures = timer
    try:
        t0 = time.perf_counter()
        recipe.fit(cfg)
        wall = time.perf_counter() - t0
    finally:
        recipe.validation_figures = timer._inner
    return {
        "select": {k: str(v) for k, v in select.items()},
        "wall_s": round(wall, 2),
        "validation_figures_s": round(timer.seconds, 2),
        "validations": timer.calls,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phantoms", type=int, default=300)
    p.add_argument("--steps", type=int, default=66)
    p.add_argument("--every", type=int, default=22, help="validate every N steps (the demo: 22)")
    p.add_argument("--subsets", default="8,24,64", help="train.select_subset values, comma-separated")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_select_"))
    print(f"machine: {machine_description()}", flush=True)
    prepared = make_data(work, args.phantoms)
    runs = []
    base = one_run(prepared, work / "loss", args.steps, args.every, {"train.select_by": "loss"})
    runs.append(base)
    rest = base["wall_s"] - base["validation_figures_s"]
    print(f"loss         {base['wall_s']:7.1f} s (sample captions {base['validation_figures_s']:.1f} s)")
    for n in (int(x) for x in args.subsets.split(",")):
        row = one_run(
            prepared,
            work / f"bertscore-{n}",
            args.steps,
            args.every,
            {
                "train.select_by": "bertscore",
                "train.select_subset": n,
                "train.select_bertscore_model": "minilm",
            },
        )
        own_rest = row["wall_s"] - row["validation_figures_s"]
        row["share_of_training"] = round(row["validation_figures_s"] / own_rest, 4)
        row["wall_over_baseline"] = round(row["wall_s"] / base["wall_s"] - 1, 4)
        runs.append(row)
        print(
            f"bertscore {n:>3} {row['wall_s']:7.1f} s  selection {row['validation_figures_s']:6.1f} s = "
            f"{100 * row['share_of_training']:5.1f}% of the rest of the run; wall +"
            f"{100 * row['wall_over_baseline']:.1f}% over selection by loss",
            flush=True,
        )
    under = [r for r in runs[1:] if r["share_of_training"] < 0.10]
    largest = max((int(r["select"]["train.select_subset"]) for r in under), default=None)
    print(f"largest subset under 10%: {largest}")
    out = {
        "machine": machine_description(),
        "phantoms": args.phantoms,
        "steps": args.steps,
        "every": args.every,
        "baseline_rest_s": round(rest, 2),
        "runs": runs,
        "largest_subset_under_10_percent": largest,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
