"""The real size on this CPU (slow, ~17 GB RAM): a few LoRA steps of the BLIP2-OPT-6.7B architecture
with random bf16 weights on phantom images, then generation; prints peak memory next to the planner's.

    flock /tmp/medcap-fullsize.lock env MEDCAP_FULLSIZE_LOCKED=1 .venv/bin/pytest -m slow tests/test_fullsize.py -s

Takes the full-size lock itself unless MEDCAP_FULLSIZE_LOCKED=1 says the caller holds it. On CPUs
without native bf16 (this AVX2 machine) ``build_model`` runs the frozen linears in fp32
(``model.cpu_fp32_matmul``: PyTorch's bf16 input-gradient product runs at ~0.2 GFLOP/s here).
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/medcap-fullsize.lock")


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return 0.0


@pytest.mark.slow
def test_6_7b_lora_steps_and_generation(tmp_path):
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_fullsize_cpu as bench
    from benchdata import peak_rss_bytes, phantom_pairs, reset_peak_rss, rss_bytes

    from medcap import plan as plan_lib
    from medcap.data import load_image
    from medcap.model import decode_captions, generation_inputs
    from medcap.train import RunConfig, TrainConfig

    lock = None
    if os.environ.get("MEDCAP_FULLSIZE_LOCKED") != "1":
        lock = LOCK.open("a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # one full-size model on this machine at a time
    try:
        if _available_gb() < 18:
            pytest.skip(
                f"needs ~18 GB of free RAM for the 6.7B architecture, {_available_gb():.1f} GB available"
            )
        torch.set_num_threads(2)
        cap, batch = 16, 2
        pairs, _ = phantom_pairs(tmp_path / "ph", 2 * batch, seed=0)
        model, processor, collator, cfg = bench.build("blip2-opt-6.7b", cap, seed=0)
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        reset_peak_rss()
        losses = []
        for k in range(2):
            batch_pairs = [(load_image(pairs[i][0]), pairs[i][1]) for i in range(k * batch, (k + 1) * batch)]
            loss, _ = bench.our_step(model, collator, batch_pairs)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
        peak = peak_rss_bytes()
        changed = sum(not torch.equal(lora[n], p.detach()) for n, p in model.named_parameters() if n in lora)
        model.eval()
        enc = generation_inputs(processor, [load_image(pairs[0][0])], "", "blip2-opt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
        caption = decode_captions(processor, out, enc["input_ids"].shape[1], "blip2-opt")
        run_cfg = RunConfig(model=cfg, train=TrainConfig(batch_size=batch, max_caption_tokens=cap))
        planned = plan_lib.plan(run_cfg, "cpu").memory.total
        print(
            f"\n6.7B bf16 LoRA steps: losses {losses}; peak RSS {peak / 1e9:.2f} GB (planner {planned / 1e9:.2f} GB); "
            f"RSS now {rss_bytes() / 1e9:.2f} GB; generated {out.shape[1] - enc['input_ids'].shape[1]} tokens: {caption!r}"
        )
        assert all(torch.isfinite(torch.tensor(losses)))
        assert changed == len(lora)  # every adapter matrix moved (lora_B starts at zero)
        assert (
            out.shape[1] - enc["input_ids"].shape[1] == 8
            or processor.tokenizer.eos_token_id in out[0].tolist()
        )
        assert planned == pytest.approx(peak, rel=0.15)
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
