"""The accelerators ``medcap plan`` knows: memory as nvidia-smi reports it and peak dense rates, plus
this kind of CPU machine (to check the memory model against measured peak RSS)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: how much memory a process can use and how fast it multiplies."""

    name: str
    #: Total memory as nvidia-smi reports it (MiB); a process can allocate nearly all of it.
    memory_mib: int
    #: Peak dense bf16 tensor-core TFLOP/s, or None where the card has no bf16 (T4, V100).
    bf16_tflops: float | None
    #: Peak dense fp16 tensor-core TFLOP/s (fp32 accumulate).
    fp16_tflops: float
    #: Peak fp32 (no tensor cores) TFLOP/s: what an unsupported dtype falls back to.
    fp32_tflops: float
    #: Where the figures come from.
    source: str
    #: CUDA context, cuBLAS workspace and kernels resident before the first tensor (GiB).
    context_gib: float = 0.6

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024


GPUS: dict[str, GpuSpec] = {
    "t4": GpuSpec("NVIDIA T4 16 GB", 15360, None, 65.0, 8.1, "NVIDIA T4 datasheet (fp16 65 TF, no bf16)"),
    "v100-16": GpuSpec(
        "NVIDIA V100 SXM2 16 GB",
        16160,
        None,
        125.0,
        15.7,
        "NVIDIA V100 datasheet (SXM2 fp16 125 TF, no bf16)",
    ),
    "v100-32": GpuSpec(
        "NVIDIA V100 SXM2 32 GB",
        32510,
        None,
        125.0,
        15.7,
        "NVIDIA V100 datasheet (SXM2 fp16 125 TF, no bf16)",
    ),
    "a10": GpuSpec(
        "NVIDIA A10 24 GB", 23028, 125.0, 125.0, 31.2, "NVIDIA A10 datasheet (125 TF dense bf16/fp16)"
    ),
    "a100-40": GpuSpec(
        "NVIDIA A100 40 GB", 40536, 312.0, 312.0, 19.5, "NVIDIA A100 datasheet (312 TF dense bf16/fp16)"
    ),
    "a100-80": GpuSpec(
        "NVIDIA A100 80 GB", 81251, 312.0, 312.0, 19.5, "NVIDIA A100 datasheet (312 TF dense bf16/fp16)"
    ),
    "h100": GpuSpec(
        "NVIDIA H100 SXM 80 GB",
        81559,
        989.0,
        989.0,
        67.0,
        "NVIDIA H100 datasheet (SXM 989 TF dense bf16/fp16); 81559 MiB as nvidia-smi showed on a lent H100",
    ),
    # Not a GPU: this kind of CPU machine, to validate the memory model against measured peak RSS.
    # Its "context" is the interpreter with torch, transformers, peft and medcap imported (measured
    # here: 0.44 GB RSS). Its rate is a rough bf16 matmul rate of 2 cores and only orients.
    "cpu": GpuSpec("this CPU machine (RSS)", 24 * 1024, 0.2, 0.2, 0.2, "measured here", context_gib=0.44),
}

# Default model FLOPs utilisation (achieved / peak dense rate) by how the weights are stored. 16-bit
# LoRA on a 7B decoder at ~100-token sequences reaches 35-50% on A100/H100 class cards; 4-bit
# weights are dequantised on the fly for every matmul (about 0.6x the 16-bit speed); LLM.int8 with
# its outlier decomposition is commonly reported at a quarter of the 16-bit speed.
DEFAULT_MFU = {"none": 0.40, "4bit": 0.40 * 0.6, "8bit": 0.40 * 0.25}
