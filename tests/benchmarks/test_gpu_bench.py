"""benchmarks/gpu_bench.py imports and its CPU-sized path (tiny model) runs end to end: the same code
that runs on a lent GPU, minus CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def gpu_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bench

    return gpu_bench


def test_lengths_histogram_is_real_rocov2(gpu_bench):
    data = json.loads(gpu_bench.LENGTHS_FILE.read_text())
    assert data["captions"] > 9000
    lengths = gpu_bench.sample_lengths(2000, 0)
    lengths.sort()
    median = lengths[len(lengths) // 2]
    assert 30 <= median <= 60  # ROCOv2 median ~17-18 words at ~2.6 shipped-BPE tokens a word


def test_quick_mode_cases(gpu_bench):
    cases = gpu_bench.cases_for(quick=True, device="cuda")
    kinds = {(c.weights, c.loop, c.ckpt) for c in cases}
    assert ("4bit", "ours", True) in kinds and ("8bit-fp16", "naive", False) in kinds
    assert ("bf16", "cached", False) in kinds and ("bf16", "ours", False) in kinds
    naive = [c for c in cases if c.loop == "naive"]
    assert naive[0].batch == 3  # the notebook's batch size


def test_cpu_tiny_path_runs(gpu_bench, tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    code = gpu_bench.main(["--device", "cpu", "--model", "tiny", "--steps", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert code == 0, out
    assert {(r["weights"], r["loop"]) for r in out["results"]} == {
        ("bf16", "ours"),
        ("bf16", "cached"),
        ("4bit", "ours"),
        ("8bit-fp16", "naive"),
    }
    for r in out["results"]:
        assert r["samples_per_s"] > 0 and r["model_tflop_per_sample"] > 0
        # Each group's model is built with no earlier one alive (the GPU runs' inflated 8-bit peak).
        assert r["stale_before_build_gib"] == 0, r["case"]
    assert "bf16 matmul" in capsys.readouterr().out
    sys.modules.pop("gpu_bench", None)


def test_stale_model_check_sees_a_model_still_alive(gpu_bench):
    """The check behind stale_before_build_gib: a BLIP-2 model someone still holds is counted."""
    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.model.build import build_model

    model, _ = build_model(ModelConfig(name_or_path="tiny", peft=PeftSettings(method="none")), verbose=False)
    held = gpu_bench._free_previous_model("cpu")
    assert held == sum(p.numel() * p.element_size() for p in model.parameters()) > 0
    del model
    assert gpu_bench._free_previous_model("cpu") == 0
    sys.modules.pop("gpu_bench", None)
