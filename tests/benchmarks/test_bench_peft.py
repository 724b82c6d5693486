"""benchmarks/bench_peft.py: its full-size path (``--device cuda --model blip2-opt-6.7b``: bf16, random
weights, time and memory per method) runs end to end on the tiny model, the same code minus CUDA, for
the methods whose build differs most (calibration batches, rotations, shared projections); and the
table it prints has a row per method. (The full-size path has not run on a GPU.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

METHODS = ["lora + eva", "oft (blocks of 16)", "vera (r 128)", "lora + loftq (4-bit)"]


@pytest.fixture
def bench_peft(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_peft

    yield bench_peft
    sys.modules.pop("bench_peft", None)


@pytest.mark.slow  # minutes: one spawned process per method, 64 phantoms at 224 px
def test_full_size_path_runs_on_the_tiny_model(bench_peft, tmp_path):
    args = argparse.Namespace(model="tiny", methods=METHODS, gpu_batch=4, gpu_steps=2)
    result = bench_peft.compare_gpu(args, tmp_path)
    failed = {r["method"]: r["error"] for r in result["runs"] if "error" in r}
    assert not failed
    assert set(result["skipped"]) == (
        {"lora + loftq (4-bit)"} if bench_peft.runnable(METHODS[-1], "cuda") else set()
    )
    summary = bench_peft.summarize(result)
    assert set(summary) == set(METHODS) - set(result["skipped"])
    assert all(s["trainable_parameters"] > 0 and s["seconds_per_step"]["mean"] > 0 for s in summary.values())
    table = bench_peft.table(result, summary)
    assert all(f"| {m} |" in table for m in METHODS)
