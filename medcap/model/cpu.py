"""Frozen bf16/fp16 linear layers on a CPU without native half-precision matrix products.

On such a CPU (most without AVX512-BF16/AMX) PyTorch's bf16 backward product runs ~100x slower than
fp32; ``upcast_frozen_linears_on_cpu`` makes frozen half-precision layers compute in fp32 from their
half-precision storage (``model.cpu_fp32_matmul``).
"""

from __future__ import annotations

import threading

import torch


def cpu_has_native_half_matmul(precision: str) -> bool:
    """Whether oneDNN runs ``precision`` (bf16/fp16) matrix products natively on this CPU.

    Without AVX512-BF16/AMX (or AVX512-FP16), PyTorch's CPU product of two bf16 matrices runs at
    ~20 GFLOP/s for ``x @ W.T`` and ~0.2 GFLOP/s for ``grad @ W`` (the input gradient of a frozen
    linear: measured on the 2-core AVX2 box, 4096x4096, 144 rows), against 55-65 GFLOP/s in fp32.
    """
    check = torch.ops.mkldnn._is_mkldnn_bf16_supported if precision == "bf16" else None
    if precision == "fp16":
        check = torch.ops.mkldnn._is_mkldnn_fp16_supported
    try:
        return bool(check()) if check is not None else True
    except (AttributeError, RuntimeError):  # an older or oneDNN-less build: assume the slow path
        return False


_UPCAST = threading.local()


def _fp32_view(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in fp32, written into this thread's reusable scratch buffer.

    A fresh ``weight.float()`` per call costs more than the product at these sizes: the allocator
    maps new pages for every large tensor and the kernel zeroes them (measured here, 4096x4096:
    89 ms for ``.float()``, 16 ms to copy into a kept buffer, against ~100 ms for the product at 144
    rows). The buffer grows to the largest weight seen (the 6.7B lm_head: 0.8 GB) and is only valid
    until the next call in the same thread, which is all one product needs.
    """
    n = weight.numel()
    buf = getattr(_UPCAST, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _UPCAST.buf = torch.empty(n, dtype=torch.float32)
    out = buf[:n].view(weight.shape)
    out.copy_(weight)
    return out


class _Fp32FrozenLinear(torch.autograd.Function):
    """``F.linear`` of a frozen half-precision layer computed in fp32; returns the input's dtype.

    The weight is upcast into a scratch buffer for the product (``_fp32_view``). Nothing but the
    weight is saved for backward: a frozen layer needs no weight gradient, so its input is not
    kept either.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        b = None if bias is None else bias.float()
        return torch.nn.functional.linear(x.float(), _fp32_view(weight), b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.float() @ _fp32_view(weight)).to(grad.dtype)
        return grad_x, None, None


class CpuFp32Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen half-precision weight is used in fp32 on the CPU.

    Set as the class of existing layers by ``upcast_frozen_linears_on_cpu`` (the parameters, the
    state dict and PEFT's view of the layer are unchanged). Anywhere else - on a GPU, with a
    trainable weight or bias, or an fp32 weight - it is exactly ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (
            w.device.type == "cpu"
            and w.dtype in (torch.bfloat16, torch.float16)
            and not w.requires_grad
            and (b is None or not b.requires_grad)
        ):
            return _Fp32FrozenLinear.apply(x, w, b)
        return super().forward(x)


def upcast_frozen_linears_on_cpu(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` compute in fp32 when frozen, half and on a CPU.

    For a bf16 BLIP-2 on a CPU without native bf16 products (the 2-core box: a 2.7B LoRA step at
    batch 2 took 1,010 s, nearly all of it in the input-gradient products of frozen layers). Only
    layers whose class is exactly ``nn.Linear`` change (quantized bitsandbytes layers and PEFT's
    adapter wrappers keep theirs; the frozen base layer inside a LoRA wrapper is such a plain
    layer). Returns how many layers changed.
    """
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = CpuFp32Linear
            n += 1
    return n
