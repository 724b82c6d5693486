"""benchmarks/gpu_bench_families.py (``gpu_bench.py --families``) imports and its CPU path (every
family's tiny model) runs end to end: the same code that runs on a lent GPU, minus CUDA. (It has not
run on a GPU yet.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


#: Three families in the default run (a 4-bit QLoRA config, anyres LLaVA-NeXT, Idefics3 tiles): the
#: others differ only in the family object, which tests/model/test_vlm_families.py covers.
SOME = "qwen2.5-vl-7b-qlora-t4,llava-1.6-mistral-7b-lora,smolvlm-2b-lora"


def test_cpu_tiny_path_runs(monkeypatch, tmp_path):
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bench
    import gpu_bench_families

    torch.set_num_threads(1)
    # Through gpu_bench.py, as a GPU session runs it.
    code = gpu_bench.main(
        [
            "--families",
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--only",
            SOME,
            "--out",
            str(tmp_path),
        ]
    )
    out = json.loads((tmp_path / "gpu_bench_families.json").read_text())
    assert code == 0, out["failed"]
    assert {r["config"] for r in out["results"]} == set(SOME.split(","))
    assert {r["family"] for r in out["results"]} == {"qwen2.5-vl", "llava-next", "idefics3"}
    # One config of every family is in the GPU run.
    from medcap.config.run import load_run_config
    from medcap.model.families import FAMILIES, resolve_family

    covered = {resolve_family(load_run_config(c).model).name for c in gpu_bench_families.CONFIGS}
    assert covered >= {f.name for f in FAMILIES if not f.name.startswith(("blip2", "instructblip-t5"))}
    for r in out["results"]:
        assert r["ours"]["samples_per_s"] > 0 and r["model_tflop_per_sample"] > 0 and r["planner_gib"] > 0
        assert r["naive"] is None or r["naive"]["samples_per_s"] > 0
    sys.modules.pop("gpu_bench_families", None)
    sys.modules.pop("gpu_bench", None)
