"""Process-wide CUDA settings that training on a GPU needs (attention kernels, allocator)."""

from __future__ import annotations

import torch


def set_cuda_attention_backends(cudnn: bool = False) -> bool:
    """Choose whether PyTorch's SDPA may use cuDNN attention (process-wide); returns the old setting.

    Call it once before training on a GPU with ``cudnn=False`` (what ``gpu_bench.py`` does). On
    Hopper and Blackwell, recent PyTorch builds try cuDNN attention first for masked bf16/fp16
    attention (our right-padded batches), and cuDNN builds and caches an execution plan for every new
    problem shape (batch, sequence length): reported at 0.4-1 s per new shape forward and as much
    again backward (pytorch/pytorch#155958, modelscope/FunASR#3704). Length-bucketed batches have a
    new width nearly every step, so a short run pays that on most steps. Without cuDNN, masked
    attention goes to the memory-efficient kernel, which needs no per-shape plan. Padding batches to
    a multiple of 8 (``CaptionCollator(pad_to_multiple_of=8)``) bounds the distinct widths either way.
    The setting is process-wide (it must hold for gradient-checkpointing recomputes too), so it is a
    call of its own rather than a side effect of ``build_model``. No effect without CUDA.
    """
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    return before


def set_cuda_allocator_defaults() -> str | None:
    """Let PyTorch's CUDA caching allocator grow segments in place (``expandable_segments``).

    Length-bucketed batches allocate activations of a different size nearly every step; with fixed
    segments the cache keeps blocks of every size seen, and the memory reserved from the GPU runs
    12-35% above what is allocated (measured on an H200 with the 6.7B LoRA step: 49.0 GiB reserved
    for 42.8 GiB allocated at batch 64, 27.5 for 20.4 with checkpointing) - memory a T4 or V100 does
    not have. Expandable segments map more memory into one segment instead. A user's own
    ``PYTORCH_CUDA_ALLOC_CONF`` wins. Returns the setting applied, or None (no CUDA, or user set).
    """
    import os

    if any(os.environ.get(v) for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return None
    if not torch.cuda.is_available():
        return None
    setting = "expandable_segments:True"
    # The environment variable only counts before CUDA starts; these set it in a running process
    # (torch.cuda.memory._set_allocator_settings, deprecated in 2.13 for the accelerator-wide one).
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    setter = setter or getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        setter(setting)
    except (TypeError, RuntimeError):
        return None
    return setting
