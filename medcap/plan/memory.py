"""Memory per GPU, by what holds it: weights (by dtype and quantisation), trainable parameters,
gradients, optimizer state, activations, logits, overhead. Family-independent; the family's plan spec
(``family.plan_spec``) supplies the activation formula."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcap.model.family import ModelFamily
from medcap.plan.gpus import GIB, GpuSpec

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig


@dataclass
class MemoryBreakdown:
    """Bytes per GPU for one training step, by what holds them."""

    weights: int
    weights_by_kind: dict[str, int]
    trainable_params: int  # count, not bytes
    trainable_bytes: int  # adapter / trained weights (already part of ``weights`` for full modules)
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.trainable_bytes
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.overhead
        )


NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize

NF4_NESTED_BLOCK = 256  # double quantisation: absmax values quantised in blocks of 256


def quantized_weight_bytes(numel: int, out_features: int, quantization: str) -> float:
    """Bytes of one bitsandbytes-quantised weight matrix (bias not included).

    4-bit NF4 with double quantisation: numel/2 packed bytes + numel/64 one-byte absmax + an fp32
    absmax (and offset) per 256 absmax blocks. 8-bit (LLM.int8): numel int8 + one fp32 scale per row.
    """
    if quantization == "4bit":
        blocks = math.ceil(numel / NF4_BLOCK)
        return numel / 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)
    if quantization == "8bit":
        return numel + 4 * out_features
    raise ValueError(f"unknown quantization {quantization!r}")


def _quantized_module_names(model: Any, model_cfg: ModelConfig, family: ModelFamily) -> set[str]:
    """Names of the Linear modules bitsandbytes replaces, by transformers' own rules."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from medcap.model.quantize import quantization_config

    qcfg = quantization_config(model_cfg, family.quant_skip)
    skip = HfQuantizer.get_modules_to_not_convert(
        model, qcfg.llm_int8_skip_modules, model._keep_in_fp32_modules
    )
    return {
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    }


def weight_bytes(model: Any, model_cfg: ModelConfig, family: ModelFamily) -> tuple[int, dict[str, int]]:
    """Total weight bytes and a breakdown by kind (``bf16``, ``fp32 (kept by the family)``, ``nf4`` ...)."""
    import torch

    quant = model_cfg.quantization
    qnames = _quantized_module_names(model, model_cfg, family) if quant != "none" else set()
    by_kind: dict[str, float] = {}
    seen: set[int] = set()
    modules = dict(model.named_modules())
    for name, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if owner in qnames and leaf == "weight":
            # A tied weight (OPT's lm_head = embed_tokens) is quantised as its own copy.
            kind = "nf4 + double-quant absmax" if quant == "4bit" else "int8 + fp32 row scales"
            out_features = modules[owner].out_features
            by_kind[kind] = by_kind.get(kind, 0) + quantized_weight_bytes(param.numel(), out_features, quant)
            continue
        if id(param) in seen:
            continue
        seen.add(id(param))
        dtype = param.dtype
        if quant != "none" and dtype in (torch.float16, torch.bfloat16):
            # prepare_model_for_kbit_training casts every non-quantised 16-bit parameter to fp32.
            dtype = torch.float32
            kind = "fp32 (cast by prepare_model_for_kbit_training)"
        else:
            kind = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
            kind = kind.replace("float32", "fp32")
            if (
                name.startswith(family.fp32_prefixes)
                and dtype == torch.float32
                and model_cfg.precision != "fp32"
            ):
                kind = f"fp32 ({family.fp32_description} kept)"
        by_kind[kind] = by_kind.get(kind, 0) + param.numel() * dtype.itemsize
    by_kind_int = {k: int(v) for k, v in by_kind.items()}
    return sum(by_kind_int.values()), by_kind_int


@dataclass
class Trainable:
    """What trains: adapter parameters and whole trained modules."""

    adapter_params: int
    module_params: int  # parameters of fully trained modules (their weights are in ``weights``)
    module_param_bytes: int
    adapter_targets: list[tuple[str, int, int]]  # (module name, in, out)
    grad_components: set[str]  # components whose parameters get gradients

    @property
    def total(self) -> int:
        return self.adapter_params + self.module_params


def component(name: str, family: ModelFamily) -> str:
    """The family part a parameter or module belongs to (``vision``, ``qformer``, ``projection``, ``lm``)."""
    for part, prefixes in family.parts.items():
        if name.startswith(prefixes):
            return part
    return "lm"


def trainable_parameters(model: Any, model_cfg: ModelConfig, family: ModelFamily) -> Trainable:
    """Count what ``build_model`` makes trainable, from module shapes alone."""
    from medcap.model.adapters import TRAIN_FLAGS, resolve_targets

    settings = model_cfg.peft
    targets: list[tuple[str, int, int]] = []
    adapter = 0
    grad_components: set[str] = set()
    if settings.method != "none":
        _, matched = resolve_targets(model, settings, family)
        modules = dict(model.named_modules())
        for name in matched:
            mod = modules[name]
            fin, fout = mod.in_features, mod.out_features
            targets.append((name, fin, fout))
            grad_components.add(component(name, family))
            if settings.method == "ia3":
                adapter += fin if name.rsplit(".", 1)[-1] in family.feedforward_names else fout
            else:
                adapter += settings.r * (fin + fout)
                if settings.method == "dora":
                    adapter += fout  # the magnitude vector
    trained_parts = {part for flag, part in TRAIN_FLAGS.items() if getattr(model_cfg, flag)}
    module_params = module_bytes = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        comp = component(name, family)
        if (model_cfg.full_finetune or comp in trained_parts) and id(param) not in seen:
            seen.add(id(param))
            module_params += param.numel()
            dtype_size = param.dtype.itemsize
            if model_cfg.quantization != "none":
                dtype_size = 4  # prepare_model_for_kbit_training made it fp32
            module_bytes += param.numel() * dtype_size
            grad_components.add(comp)
    return Trainable(adapter, module_params, module_bytes, targets, grad_components)


def optimizer_bytes(trainable: Trainable, optimizer: str, adapter_bytes_per_param: int = 4) -> int:
    """AdamW keeps two states per parameter in the parameter's dtype; 8-bit AdamW two bytes (bitsandbytes
    keeps tensors under 4096 elements in 32-bit: LoRA's r x in matrices are larger, so ignored)."""
    if optimizer == "adamw8bit":
        return 2 * trainable.total
    module_state = 2 * trainable.module_param_bytes
    return 2 * adapter_bytes_per_param * trainable.adapter_params + module_state


@dataclass(frozen=True)
class ActDtypes:
    """Element sizes (bytes) of the tensors a layer saves, for one precision regime.

    ``res``: the residual stream (embedding dtype: 2 for bf16/fp16 weights; 4 for fp32 weights and for
    quantised models, whose embeddings and norms prepare_model_for_kbit_training made fp32);
    ``lin``: outputs of the frozen linears (inputs of attention and of the activation function);
    ``attn``: what scaled-dot-product attention saves (q, k, v, out); ``lora``: the adapter input
    (PEFT casts it to the fp32 adapter dtype; under autocast the linear saves a 16-bit copy);
    ``mask_res`` / ``mask_lora``: the mask of the dropout after attention / fc2 and of the LoRA
    dropout (CUDA saves a bool mask; the CPU saves the scaled noise in the dropped tensor's dtype).
    """

    res: int
    lin: int
    attn: int
    lora: int
    mask_res: int
    mask_lora: int


def act_dtypes(model_cfg: ModelConfig, mixed_precision: str, device: str) -> ActDtypes:
    """Element sizes for ``model_cfg`` trained with ``mixed_precision`` (autocast) on ``device``."""
    weight = {"fp32": 4, "fp16": 2, "bf16": 2}[model_cfg.precision]
    quantized = model_cfg.quantization != "none"
    autocast = mixed_precision in ("fp16", "bf16")
    res = 4 if quantized else weight
    # bitsandbytes layers return their input's dtype (the fp32 residual stream) even under autocast.
    lin = res if quantized else (2 if autocast else weight)
    attn = 2 if autocast else lin
    lora = 2 if autocast else 4
    cpu = device == "cpu"
    return ActDtypes(
        res=res,
        lin=lin,
        attn=attn,
        lora=lora,
        mask_res=lin if cpu else 1,
        mask_lora=4 if cpu else 1,
    )


def memory_for_batch(
    b: int,
    s: int,
    spec: Any,
    trainable: Trainable,
    weights: int,
    weights_by_kind: dict[str, int],
    model_cfg: ModelConfig,
    optimizer: str,
    mixed_precision: str,
    gpu: GpuSpec,
    gpus: int,
    device: str,
) -> MemoryBreakdown:
    """The memory breakdown for micro-batch ``b`` at sequence length ``s``."""
    e = act_dtypes(model_cfg, mixed_precision, device)
    acts, logits = spec.activation_bytes(trainable, model_cfg, e, b, s, mixed_precision)
    adapter_bytes = 4 * trainable.adapter_params  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    grads = adapter_bytes + trainable.module_param_bytes
    if gpus > 1:
        grads += adapter_bytes + trainable.module_param_bytes  # DDP's gradient buckets
    opt = optimizer_bytes(trainable, optimizer)
    # Allocator slack: blocks cached between the forward's and the backward's different sizes.
    slack = 0.0 if device == "cpu" else 0.08 * (acts + logits)
    overhead = int(gpu.context_gib * GIB + slack)
    return MemoryBreakdown(
        weights=weights,
        weights_by_kind=weights_by_kind,
        trainable_params=trainable.total,
        trainable_bytes=adapter_bytes,
        gradients=grads,
        optimizer=opt,
        activations=acts,
        logits=logits,
        overhead=overhead,
    )


__all__ = [
    "ActDtypes",
    "MemoryBreakdown",
    "Trainable",
    "act_dtypes",
    "component",
    "memory_for_batch",
    "optimizer_bytes",
    "quantized_weight_bytes",
    "trainable_parameters",
    "weight_bytes",
]
