"""Will this config fit my GPU, and how long will an epoch take? (``medcap plan``)

``plan(run_cfg, gpu, gpus) -> Plan`` builds the model of ``run_cfg.model`` on the META device (no
weights are allocated, nothing is downloaded: the architectures' configs ship in
``medcap/model/assets``), reads every parameter's shape and dtype from it, and adds up, per GPU:

* **weights**, by dtype and quantisation exactly as ``build_model`` leaves them: bf16/fp16/fp32, the
  family's fp32 parts (BLIP-2's Q-Former and query tokens) kept fp32, bitsandbytes 8-bit (int8 + one
  fp32 scale per output row) and 4-bit NF4 (half a byte per weight + one 8-bit absmax per 64-block +
  one fp32 absmax per 256 such blocks with double quantisation). With quantisation,
  ``prepare_model_for_kbit_training`` casts every other 16-bit parameter to fp32: counted;
* **trainable parameters** (LoRA: r x (in + out) per target, DoRA adds the magnitude vector, (IA)3 one
  vector per target; or whole family parts), their **gradients** (same dtype as the parameter: PEFT
  keeps adapters in fp32) and the **optimizer state** (AdamW: two states per parameter; 8-bit AdamW:
  two bytes per parameter for tensors of 4096+ elements);
* **activations**: what autograd keeps for the backward pass, from the family's plan spec
  (``family.plan_spec``, built on the per-layer formulas of ``layers``), with and without gradient
  checkpointing, at the config's sequence length, plus the logits and the loss at the start of the
  backward pass;
* **overhead**: the CUDA context and cuBLAS workspace, and allocator slack (on ``--gpu cpu``: the
  interpreter with torch and transformers loaded, measured here).

It then says whether it fits, the largest micro-batch that fits, and an epoch time from the FLOPs per
sample over the card's peak dense 16-bit rate at a stated utilisation.

The formulas were checked against what autograd really saves (``tests/plan/test_plan.py`` counts the
saved tensors of a scaled-down model with ``torch.autograd.graph.saved_tensors_hooks``) and against
peak memory measured with the full-size random-weight models on this CPU (``recorded``;
``benchmarks/bench_fullsize_cpu.py`` measures them again).

Modules: ``gpus``, ``memory``, ``layers``, ``planner`` (``plan``, ``Plan``, ``meta_model``), ``recorded``.
"""

from medcap.plan.gpus import GIB, GPUS, GpuSpec
from medcap.plan.planner import Plan, meta_model, plan, sequence_lengths
from medcap.plan.recorded import RECORDED_CPU_PEAKS

__all__ = ["GIB", "GPUS", "GpuSpec", "Plan", "RECORDED_CPU_PEAKS", "meta_model", "plan", "sequence_lengths"]
