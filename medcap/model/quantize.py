"""bitsandbytes weight quantization (8-bit LLM.int8, 4-bit NF4 with double quantization) for
pretrained loads and for random-init builds of the full-size architectures."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig


log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype 4-bit layers compute in (``model.compute_dtype``, else the weight precision)."""
    if cfg.compute_dtype != "auto":
        return DTYPES[cfg.compute_dtype]
    return DTYPES[cfg.precision]


def quantization_config(cfg: ModelConfig, skip_modules: tuple[str, ...]):
    """transformers' ``BitsAndBytesConfig`` for ``cfg.quantization``, leaving ``skip_modules`` alone."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        llm_int8_skip_modules=list(skip_modules),
    )


def device_map() -> dict[str, Any]:
    """Quantized loading needs a device map: this process's GPU, or the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def pretrained_kwargs(cfg: ModelConfig, skip_modules: tuple[str, ...]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the precision and quantization of ``cfg``."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.precision]}
    if cfg.quantization != "none":
        kwargs["quantization_config"] = quantization_config(cfg, skip_modules)
        kwargs["device_map"] = device_map()
    return kwargs


def quantize_in_memory(
    make_model: Callable[[], Any],
    cfg: ModelConfig,
    model_class: type,
    skip_modules: tuple[str, ...],
    keep_weights_in: str | None = None,
):
    """Quantize a random-init model's linears with bitsandbytes by a save/load round trip.

    bitsandbytes quantizes while loading, so the random model goes through ``from_pretrained`` from a
    temporary folder: the same code path as the hub weights. The 16-bit model is made here and freed
    before the load (its only reference dropped, its reference cycles collected): the 6.7B QLoRA dry
    run peaked at 24.0 GB of RAM, the whole 24 GB machine, while both were alive.

    ``keep_weights_in``: save the 16-bit weights into this folder (the caller's, kept after the
    load) instead of a temporary one: LoftQ reads them to start LoRA against the quantization error.
    """
    log.info(
        "quantizing the random model %s through a temporary save (%s)", cfg.name_or_path, cfg.quantization
    )
    folder = (
        contextlib.nullcontext(keep_weights_in)
        if keep_weights_in is not None
        else tempfile.TemporaryDirectory(prefix="medcap-quant-")
    )
    with folder as tmp:
        model = make_model()
        model.save_pretrained(tmp)
        del model
        gc.collect()
        quantized = model_class.from_pretrained(tmp, **pretrained_kwargs(cfg, skip_modules))
    return quantized


# bitsandbytes' CPU inference layout packs the output rows in blocks of this many (block_n of
# bitsandbytes.functional._convert_weight_packed_for_cpu, 0.50).
CPU_PACK_BLOCK = 32


def cpu_safe_4bit_layers(model: Any) -> int:
    """Keep the 4-bit layers whose shape bitsandbytes' CPU inference layout cannot pack out of it.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer at its first eval-mode
    forward without gradients, which needs the output size to be a multiple of 32 ("N must be
    divisible by block_n") and the input size a multiple of the quantization block (64: else "shape
    '[1280, 53]' is invalid"). Qwen2.5-VL's vision MLP (3,420 wide, in and out) stopped the first
    validation of the QLoRA config there. Those layers keep the general 4-bit kernel (the same
    arithmetic, no repacking); every other layer is left as it is. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        block = getattr(state, "blocksize", None) or 64
        if module.out_features % CPU_PACK_BLOCK or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@contextlib.contextmanager
def keep_4bit_training_layout(model: Any):
    """Run forwards that come before training (EVA's, CorDA's statistics) without bitsandbytes'
    inference repacking.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights in place at its
    first eval-mode forward without gradients, for a faster inference kernel that has no backward:
    a training forward afterwards fails ("a view of a leaf Variable ... in-place operation"). It
    undoes the packing only when the state dict is written (fit() saves a checkpoint after every
    validation, which is why validating mid-run works)."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    before = [m.support_avx512bf16_for_cpu for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, value in zip(layers, before, strict=True):
            m.support_avx512bf16_for_cpu = value


__all__ = [
    "DTYPES",
    "compute_dtype",
    "device_map",
    "keep_4bit_training_layout",
    "pretrained_kwargs",
    "quantization_config",
    "quantize_in_memory",
]
