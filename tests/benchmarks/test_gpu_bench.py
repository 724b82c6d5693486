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
    notebook = [c for c in cases if c.name == gpu_bench.NOTEBOOK]
    assert [(c.weights, c.batch) for c in notebook] == [("8bit-fp16", 3)]  # the notebook's recipe
    # Like for like: every naive run has our loop at the same weights, batch and checkpointing.
    for naive in (c for c in cases if c.loop == "naive"):
        assert any(
            (c.weights, c.batch, c.ckpt, c.loop) == (naive.weights, naive.batch, naive.ckpt, "ours")
            for c in cases
        ), naive
    assert {("bf16", 32), ("bf16", 64), ("4bit", 8)} <= {
        (c.weights, c.batch) for c in cases if c.loop == "naive"
    }


def test_cpu_tiny_path_runs(gpu_bench, tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    code = gpu_bench.main(["--device", "cpu", "--model", "tiny", "--steps", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert code == 0, out
    assert {(r["weights"], r["loop"]) for r in out["results"]} == {
        ("bf16", "ours"),
        ("bf16", "naive"),
        ("bf16", "cached"),
        ("4bit", "ours"),
        ("8bit-fp16", "ours"),
        ("8bit-fp16", "naive"),
    }
    for r in out["results"]:
        assert r["samples_per_s"] > 0 and r["model_tflop_per_sample"] > 0
        # Each group's model is built with no earlier one alive (the GPU runs' inflated 8-bit peak).
        assert r["stale_before_build_gib"] == 0, r["case"]

    # The comparisons, each between two cases of this run.
    by_kind: dict[str, list[dict]] = {}
    for c in out["comparisons"]:
        by_kind.setdefault(c["kind"], []).append(c)
        assert c["ours_over_naive"] > 0
    same_batch = by_kind["like for like: same weights, same batch"]
    assert {(c["weights"], c["ours"]["batch"], c["naive"]["batch"]) for c in same_batch} == {
        ("bf16", 4, 4),
        ("8bit-fp16", 3, 3),
    }
    # Same memory: ours' largest batch without checkpointing (6) is the budget (planned on the CPU);
    # the naive loop ran again at the largest batch within it (6: the loops plan the same here).
    same_memory = {c["weights"]: c for c in by_kind["like for like: same weights, same memory"]}
    assert set(same_memory) == {"bf16", "8bit-fp16"}
    bf16 = same_memory["bf16"]
    assert bf16["ours"]["batch"] == bf16["naive"]["batch"] == 6 and not bf16["budget_measured"]
    assert bf16["naive"]["planned_gib"] <= bf16["budget_gib"]
    budget_runs = [r for r in out["results"] if r.get("budget_run")]
    assert [(r["weights"], r["batch"], r["loop"]) for r in budget_runs] == [("bf16", 6, "naive")]
    assert same_memory["8bit-fp16"]["naive"]["case"] == gpu_bench.NOTEBOOK  # batch 3 already ran
    (recipe,) = [
        c for k, cs in by_kind.items() if k.startswith("recipe comparison (not like for like)") for c in cs
    ]
    assert recipe["naive"]["case"] == gpu_bench.NOTEBOOK and recipe["weights"] == "bf16 vs 8bit-fp16"
    printed = capsys.readouterr().out
    assert "bf16 matmul" in printed and "like for like: same weights, same memory, bf16" in printed
    sys.modules.pop("gpu_bench", None)


def test_budget_case_picks_the_largest_naive_batch_within_ours_peak(gpu_bench):
    """The same-memory batch: the planner's figures for the naive loop, scaled by its own measured /
    planned ratio, against ours' measured peak; gradient-checkpointed and failed runs do not count."""
    per_batch = {str(b): 10.0 + 0.5 * b for b in range(1, 129)}  # planned GiB at batch b
    ours = {"loop": "ours", "batch": 64, "gradient_checkpointing": False, "planned_gib": 42.0}
    naive = {"loop": "naive", "batch": 64, "gradient_checkpointing": False, "planned_by_batch_gib": per_batch}
    group = [
        {**ours, "peak_reserved_gib": 44.0},
        {**ours, "batch": 96, "gradient_checkpointing": True, "planned_gib": 30.0, "peak_reserved_gib": 31.0},
        {"case": "x", "batch": 128, "error": "OOM"},
        # The naive run measured 10% over its plan at batch 64: 42 GiB planned, 46.2 measured.
        {**naive, "planned_gib": 42.0, "peak_reserved_gib": 46.2},
    ]
    case = gpu_bench.budget_case(group, "bf16", max_batch=256)
    # Largest b with (10 + b/2) x 1.1 <= 44: b = 60.
    assert (case.batch, case.loop, case.weights, case.budget_of) == (60, "naive", "bf16", 64)
    assert gpu_bench.budget_case(group, "bf16", max_batch=32).batch == 32
    assert gpu_bench.budget_case(group[:3], "bf16", max_batch=256) is None  # no naive run to calibrate on
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
