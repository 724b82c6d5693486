"""Will this config fit my GPU, and how long will an epoch take? (``medcap plan``)

``plan(run_cfg, gpu, gpus) -> Plan`` builds the model of ``run_cfg.model`` on the META device (no
weights are allocated, nothing is downloaded: the Salesforce configs ship in
``medcap/model_configs``), reads every parameter's shape and dtype from it, and adds up, per GPU:

* **weights**, by dtype and quantisation exactly as ``build_model`` leaves them: bf16/fp16/fp32, the
  Q-Former and query tokens kept in fp32, bitsandbytes 8-bit (int8 + one fp32 scale per output row)
  and 4-bit NF4 (half a byte per weight + one 8-bit absmax per 64-block + one fp32 absmax per 256
  such blocks with double quantisation). With quantisation, ``prepare_model_for_kbit_training``
  casts every other 16-bit parameter (embeddings, norms, biases, the Q-Former) to fp32: counted;
* **trainable parameters** (LoRA: r x (in + out) per target, DoRA adds the magnitude vector, (IA)3 one
  vector per target; or whole modules), their **gradients** (same dtype as the parameter: PEFT keeps
  adapters in fp32) and the **optimizer state** (AdamW: two states per parameter; 8-bit AdamW: two
  bytes per parameter for tensors of 4096+ elements);
* **activations**: what autograd keeps for the backward pass, per layer, from a formula written out
  in ``opt_layer_saved_bytes`` / ``encoder_layer_saved_bytes`` (with and without gradient
  checkpointing) at the config's sequence length (query tokens + BOS + prompt + caption tokens + EOS),
  plus the logits and the loss at the start of the backward pass;
* **overhead**: the CUDA context and cuBLAS workspace, and allocator slack (on ``--gpu cpu``: the
  interpreter with torch and transformers loaded, measured here).

It then says whether it fits, the largest micro-batch that fits, and an epoch time from the FLOPs per
sample (``train_flops_per_sample``) over the card's peak dense 16-bit rate at a stated utilisation.

The formulas were checked against what autograd really saves (``tests/test_plan.py`` counts the
saved tensors of a scaled-down model with ``torch.autograd.graph.saved_tensors_hooks``) and against
peak memory measured with the full-size random-weight models on this CPU (``RECORDED_CPU_PEAKS``;
``benchmarks/bench_fullsize_cpu.py`` measures them again).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3

# ---------------------------------------------------------------------------------------------
# GPUs: memory as nvidia-smi reports it, peak DENSE tensor-core rates (no 2:4 sparsity).
# ---------------------------------------------------------------------------------------------


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

# ---------------------------------------------------------------------------------------------
# Recorded measurements on this CPU machine (2 cores, 24 GB), peak RSS of one bf16 LoRA (q,v r=16,
# dropout 0.05) training step with random weights: benchmarks/bench_fullsize_cpu.py --measure-peak.
# The test suite checks the planner against these numbers (within 15%).
# ---------------------------------------------------------------------------------------------
RECORDED_CPU_PEAKS: list[dict[str, Any]] = [
    {
        "model": "Salesforce/blip2-opt-6.7b",
        "batch_size": 2,
        "caption_cap": 64,
        "peak_rss_bytes": 17.0e9,
        "source": "issue 3: 'about 17 GB peak resident memory' for a LoRA q,v r=16 step at batch 2, measured on "
        "this kind of machine by an earlier session (caption length not stated: the default cap is assumed)",
    },
    {
        "model": "Salesforce/blip2-opt-2.7b",
        "batch_size": 2,
        "caption_cap": 64,
        "peak_rss_bytes": 8.0e9,
        "source": "issue 3: 'the 2.7B one takes about 3 s and 8 GB', same setting",
    },
    {
        "model": "Salesforce/blip2-opt-2.7b",
        "batch_size": 2,
        "caption_cap": 16,
        "peak_rss_bytes": 9_159_401_472,
        "source": "measured in this session (2026-11-28): bench_fullsize_cpu.py --model blip2-opt-2.7b "
        "--measure-peak --steps 0 --batch-size 2 --cap 16 (50 tokens); RSS after build 8.25 GB; planner "
        "8.65 GB (-5.5%); the step itself added 0.90 GB against 0.48 GB planned (see docs/PERFORMANCE.md)",
    },
    {
        "model": "Salesforce/blip2-opt-6.7b",
        "batch_size": 2,
        "caption_cap": 64,
        "peak_rss_bytes": 19_390_000_000,
        "source": "measured in the second session (2026-11-28), idle box: bench_fullsize_cpu.py --model "
        "blip2-opt-6.7b --steps 2, our loop (94 tokens a sample at real ROCOv2 lengths, cap 64), with the "
        "CPU fp32 path of frozen bf16 linears (its 0.8 GB buffer included); RSS after build 16.28 GB; "
        "planner 17.48 GB (-10%)",
    },
    # The AVX-512 box (AMD EPYC Zen 5 with AVX512-BF16: native bf16 products, no fp32 path).
    {
        "model": "Salesforce/blip2-opt-6.7b",
        "batch_size": 2,
        "caption_cap": 64,
        "peak_rss_bytes": 18_150_000_000,
        "source": "measured in the third session (2026-12-01), AVX-512 box, idle: bench_fullsize_cpu.py --model "
        "blip2-opt-6.7b --measure-peak --steps 2 (98 tokens a sample); RSS after build 16.29 GB; planner "
        "17.48 GB (-3.6%)",
    },
    {
        "model": "Salesforce/blip2-opt-2.7b",
        "batch_size": 2,
        "caption_cap": 64,
        "peak_rss_bytes": 9_480_000_000,
        "source": "measured in the third session (2026-12-01), AVX-512 box, idle: bench_fullsize_cpu.py --model "
        "blip2-opt-2.7b --measure-peak --steps 2 (98 tokens a sample); RSS after build 8.26 GB; planner "
        "9.03 GB (-4.7%)",
    },
    {
        "model": "Salesforce/blip2-opt-6.7b",
        "batch_size": 2,
        "caption_cap": 16,
        "peak_rss_bytes": 17_360_000_000,
        "source": "measured in the third session (2026-12-01), AVX-512 box: tests/test_fullsize.py (pytest -m "
        "slow; two steps at cap 16, 50 tokens a sample); planner 16.92 GB (-2.5%)",
    },
]

# ---------------------------------------------------------------------------------------------
# The model's shape, read off the meta-device model
# ---------------------------------------------------------------------------------------------


@dataclass
class Dims:
    """Layer dimensions the activation and FLOP formulas need."""

    # Vision tower (ViT)
    vit_layers: int
    vit_hidden: int
    vit_ffn: int
    vit_heads: int
    vit_tokens: int  # patches + CLS
    vit_patch_flops: int  # one image through the patch embedding (multiply-adds x 2)
    # Q-Former
    qf_layers: int
    qf_hidden: int
    qf_ffn: int
    qf_heads: int
    qf_cross_every: int
    num_query_tokens: int
    # Language model (OPT decoder only for the activation formula; T5 is approximated)
    lm_layers: int
    lm_hidden: int
    lm_ffn: int
    lm_heads: int
    vocab: int
    lm_dropout: float
    qf_dropout: float
    decoder_only: bool


@dataclass
class Components:
    """Parameter counts of the model's parts (from the meta model)."""

    vision: int
    qformer: int  # incl. query tokens
    projection: int
    lm: int  # incl. embeddings
    lm_embeddings: int


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


@dataclass
class Plan:
    """The planner's answer for one config on one GPU type."""

    config: str
    model: str
    gpu: str
    gpu_spec: GpuSpec
    gpus: int
    batch_size: int
    seq_len_max: int
    seq_len_mean: float
    precision: str
    mixed_precision: str
    quantization: str
    peft: str
    gradient_checkpointing: bool
    optimizer: str
    total_params: int
    trainable_params: int
    memory: MemoryBreakdown
    fits: bool
    max_batch_size: int
    train_flops_per_sample: float
    model_flops_per_sample: float
    vision_flops_per_sample: float
    peak_tflops: float
    utilisation: float
    train_images: int
    train_images_source: str
    epoch_seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"]["total"] = self.memory.total
        return d

    def report(self) -> str:
        """The human-readable table ``medcap plan`` prints."""
        m = self.memory

        def gb(x: float) -> str:
            return f"{x / GIB:8.2f} GiB"

        lines = [
            f"plan for {self.config}: {self.model}",
            f"  precision {self.precision}, mixed precision {self.mixed_precision}, quantization "
            f"{self.quantization}, peft {self.peft}, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, optimizer {self.optimizer}",
            f"  micro-batch {self.batch_size} per GPU x {self.gpus} GPU(s); sequence {self.seq_len_max} tokens "
            f"at most (query tokens + BOS + prompt + caption cap + EOS), {self.seq_len_mean:.1f} on average",
            f"  parameters: {self.total_params / 1e9:.3f}B total, {self.trainable_params / 1e6:.3f}M trainable",
            f"memory per GPU on {self.gpu_spec.name} ({self.gpu_spec.memory_mib / 1024:.1f} GiB):",
        ]
        for kind, nbytes in sorted(m.weights_by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"  weights {kind:<34}{gb(nbytes)}")
        lines += [
            f"  weights, all{'':<30}{gb(m.weights)}",
            f"  trainable parameters (adapters){'':<11}{gb(m.trainable_bytes)}",
            f"  gradients{'':<33}{gb(m.gradients)}",
            f"  optimizer state ({self.optimizer}){'':<{max(1, 24 - len(self.optimizer))}}{gb(m.optimizer)}",
            f"  activations kept for backward{'':<13}{gb(m.activations)}",
            f"  logits and loss (backward start){'':<10}{gb(m.logits)}",
            f"  CUDA context, workspace, allocator slack{'':<2}{gb(m.overhead)}",
            f"  TOTAL{'':<37}{gb(m.total)}",
            f"fits: {'YES' if self.fits else 'NO'} ({100 * m.total / self.gpu_spec.memory_bytes:.0f}% of the card); "
            f"largest micro-batch that fits: {self.max_batch_size}",
            f"time: {self.train_flops_per_sample / 1e12:.2f} TFLOP per training sample at the mean length "
            f"(vision {self.vision_flops_per_sample / 1e12:.2f}); {self.peak_tflops:.0f} TFLOP/s peak x "
            f"{100 * self.utilisation:.0f}% utilisation x {self.gpus} GPU(s)",
            f"  epoch of {self.train_images:,} images ({self.train_images_source}): "
            f"{_duration(self.epoch_seconds)}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# Building the model on the meta device
# ---------------------------------------------------------------------------------------------


def meta_model(model_cfg: Any):
    """``(model, family)``: the BLIP-2 of ``model_cfg`` with every parameter on the meta device.

    Dtypes follow ``build_model``: ``precision`` everywhere except the Q-Former and query tokens
    (fp32). No PEFT is applied (the planner counts adapters from the matched module shapes).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import Blip2ForConditionalGeneration

    from medcap import model as model_lib

    family = model_lib.resolve_family(model_cfg)
    if model_cfg.name_or_path in model_lib.TINY_NAMES:
        tok = model_lib.offline_tokenizer(family)
        special = model_lib._special_ids(tok)
        config = model_lib.tiny_blip2_config(family, model_lib._round_up(len(tok)), special["image"], special)
    else:
        path = model_lib._config_json_path(model_cfg.name_or_path)
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"model.name_or_path {model_cfg.name_or_path!r}: no config.json here to plan from; the "
                f"planner needs a shipped config ({', '.join(model_lib.SHIPPED_CONFIGS)}) or a local folder"
            )
        config = model_lib._blip2_config_from_file(path)
    if model_cfg.image_size:
        config.vision_config.image_size = model_cfg.image_size
    with init_empty_weights(include_buffers=False):
        model = Blip2ForConditionalGeneration(config)
    dtype = model_lib.DTYPES[model_cfg.precision]
    for module_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            want = torch.float32 if full.startswith(("qformer.", "query_tokens")) else dtype
            module._parameters[pname] = torch.nn.Parameter(
                torch.empty(param.shape, dtype=want, device="meta"), requires_grad=False
            )
    model.tie_weights()
    return model, family


def _dims(model: Any, family: str) -> Dims:
    cfg = model.config
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2
    if family == "blip2-opt":
        lm_layers, lm_hidden, lm_ffn, lm_heads = (
            t.num_hidden_layers,
            t.hidden_size,
            t.ffn_dim,
            t.num_attention_heads,
        )
        lm_dropout = t.dropout
    else:  # T5: encoder + decoder layers, d_ff; approximated as one stack of both
        lm_layers, lm_hidden, lm_ffn, lm_heads = (
            t.num_layers + t.num_decoder_layers,
            t.d_model,
            t.d_ff,
            t.num_heads,
        )
        lm_dropout = t.dropout_rate
    return Dims(
        vit_layers=v.num_hidden_layers,
        vit_hidden=v.hidden_size,
        vit_ffn=v.intermediate_size,
        vit_heads=v.num_attention_heads,
        vit_tokens=patches + 1,
        vit_patch_flops=2 * patches * 3 * v.patch_size**2 * v.hidden_size,
        qf_layers=q.num_hidden_layers,
        qf_hidden=q.hidden_size,
        qf_ffn=q.intermediate_size,
        qf_heads=q.num_attention_heads,
        qf_cross_every=q.cross_attention_frequency,
        num_query_tokens=cfg.num_query_tokens,
        lm_layers=lm_layers,
        lm_hidden=lm_hidden,
        lm_ffn=lm_ffn,
        lm_heads=lm_heads,
        vocab=t.vocab_size,
        lm_dropout=float(lm_dropout or 0.0),
        qf_dropout=float(q.hidden_dropout_prob or 0.0),
        decoder_only=family == "blip2-opt",
    )


def _component(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith(("qformer.", "query_tokens")):
        return "qformer"
    if name.startswith("language_projection."):
        return "projection"
    return "lm"


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

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


def _quantized_module_names(model: Any, model_cfg: Any) -> set[str]:
    """Names of the Linear modules bitsandbytes replaces, by transformers' own rules."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from medcap import model as model_lib

    qcfg = model_lib._quantization_config(model_cfg)
    skip = HfQuantizer.get_modules_to_not_convert(
        model, qcfg.llm_int8_skip_modules, model._keep_in_fp32_modules
    )
    return {
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    }


def weight_bytes(model: Any, model_cfg: Any) -> tuple[int, dict[str, int]]:
    """Total weight bytes and a breakdown by kind (``bf16``, ``fp32 (Q-Former, ...)``, ``nf4`` ...)."""
    import torch

    quant = model_cfg.quantization
    qnames = _quantized_module_names(model, model_cfg) if quant != "none" else set()
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
            if _component(name) == "qformer" and dtype == torch.float32 and model_cfg.precision != "fp32":
                kind = "fp32 (Q-Former, query tokens kept)"
        by_kind[kind] = by_kind.get(kind, 0) + param.numel() * dtype.itemsize
    by_kind_int = {k: int(v) for k, v in by_kind.items()}
    return sum(by_kind_int.values()), by_kind_int


# ---------------------------------------------------------------------------------------------
# Trainable parameters
# ---------------------------------------------------------------------------------------------


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


def trainable_parameters(model: Any, model_cfg: Any, family: str) -> Trainable:
    """Count what ``build_model`` makes trainable, from module shapes alone."""
    from medcap import model as model_lib

    settings = model_cfg.peft
    targets: list[tuple[str, int, int]] = []
    adapter = 0
    grad_components: set[str] = set()
    if settings.method != "none":
        _, matched = model_lib.resolve_targets(model, settings, family)
        modules = dict(model.named_modules())
        ff_names = model_lib.FEEDFORWARD_NAMES[family]
        for name in matched:
            mod = modules[name]
            fin, fout = mod.in_features, mod.out_features
            targets.append((name, fin, fout))
            grad_components.add(_component(name))
            if settings.method == "ia3":
                adapter += fin if name.rsplit(".", 1)[-1] in ff_names else fout
            else:
                adapter += settings.r * (fin + fout)
                if settings.method == "dora":
                    adapter += fout  # the magnitude vector
    module_params = module_bytes = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        comp = _component(name)
        train = (
            model_cfg.full_finetune
            or (model_cfg.train_qformer and comp == "qformer")
            or (model_cfg.train_vision and comp == "vision")
            or (model_cfg.train_language_projection and comp == "projection")
        )
        if train and id(param) not in seen:
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


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves, per layer
# ---------------------------------------------------------------------------------------------


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


def act_dtypes(model_cfg: Any, mixed_precision: str, device: str) -> ActDtypes:
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


def opt_layer_saved_bytes(
    b: int,
    s: int,
    h: int,
    f: int,
    heads: int,
    e: ActDtypes,
    dropout: float,
    lora: list[tuple[str, int]],
    lora_r: int,
    lora_dropout: float,
) -> int:
    """Bytes one pre-LN OPT decoder layer keeps for the backward pass (frozen base weights, gradients
    flowing through it), with scaled-dot-product attention (no s x s matrix is kept):

    * self_attn_layer_norm: its input (res x b*s*h) and mean/rstd (2 x 4 x b*s);
    * attention: q, k, v and the output (4 x attn x b*s*h) and the log-sum-exp (4 x b*heads*s);
    * dropout after attention and after fc2 (p = config.dropout): a mask each (mask_res x b*s*h);
    * final_layer_norm: its input and statistics;
    * fc1 -> ReLU: the ReLU output (lin x b*s*f), which is also fc2's input;
    * frozen base linears save nothing more (a frozen weight needs no input to get the input's grad);
    * per LoRA target with input width d: the adapter input (lora x b*s*d; with lora dropout also its
      mask, mask_lora x b*s*d) and lora_A's output (lora x b*s*r).
    """
    tokens = b * s
    total = 2 * (e.res * tokens * h + 8 * tokens)  # two layer norms: input + mean/rstd
    total += 4 * e.attn * tokens * h + 4 * b * heads * s
    if dropout > 0:
        total += 2 * e.mask_res * tokens * h
    total += e.lin * tokens * f
    for _, d in lora:
        total += e.lora * tokens * d + e.lora * tokens * lora_r
        if lora_dropout > 0:
            total += e.mask_lora * tokens * d
    return int(total)


def encoder_layer_saved_bytes(b: int, n: int, h: int, f: int, heads: int, e: int, trains: bool) -> int:
    """Bytes one pre-LN ViT / Q-Former layer keeps for backward.

    ``trains``: its own weights train, so every linear also keeps its input: layer norm inputs
    (2 x e*b*n*h), qkv input, q/k/v/out (4), projection input (= out), fc1 input, GELU input and fc2
    input (2 x e*b*n*f): 8 x e*b*n*h + 2 x e*b*n*f. Frozen but on the gradient path: layer-norm
    inputs, attention tensors and the GELU input: 6 x e*b*n*h + e*b*n*f.
    """
    tokens = b * n
    if trains:
        return int(8 * e * tokens * h + 2 * e * tokens * f + 4 * b * heads * n)
    return int(6 * e * tokens * h + e * tokens * f + 4 * b * heads * n)


def lora_inputs_per_layer(trainable: Trainable, dims: Dims) -> list[tuple[str, int]]:
    """(module leaf name, input width) of the LoRA targets in ONE language-model layer."""
    lm = [t for t in trainable.adapter_targets if _component(t[0]) == "lm"]
    if not lm or dims.lm_layers == 0:
        return []
    per_layer: dict[str, int] = {}
    for name, fin, _ in lm:
        per_layer[name.rsplit(".", 1)[-1]] = fin
    return sorted(per_layer.items())


def activation_bytes(
    dims: Dims,
    trainable: Trainable,
    model_cfg: Any,
    e: ActDtypes,
    b: int,
    s: int,
    mixed_precision: str = "no",
) -> tuple[int, int]:
    """(activations kept for backward, logits/loss peak) in bytes for micro-batch ``b`` at length ``s``.

    Gradients flow from the loss down to the lowest trainable part: through the LM whenever anything
    trains, through the Q-Former when it or the vision tower trains, through the ViT only when it
    trains. With gradient checkpointing each checkpointed layer keeps only its input (res x b*s*h)
    and one layer's activations are rebuilt at a time during backward.

    Logits at the start of backward: the lm_head output (lin bytes), the fp32 log-probabilities the
    cross-entropy keeps, their fp32 gradient and the gradient of the logits in fp32 and in the lm_head
    dtype: (lin + 4 + 4 + 4 + lin) x b*s*vocab, minus one lin for the logits freed after the loss.
    """
    comps = trainable.grad_components
    ckpt = model_cfg.gradient_checkpointing
    lora_layer = lora_inputs_per_layer(trainable, dims)
    r = model_cfg.peft.r
    lora_dropout = model_cfg.peft.dropout if model_cfg.peft.method in ("lora", "dora", "rslora") else 0.0
    total = 0
    if comps:  # anything trains: the loss's gradient goes through the whole LM
        full_lm = dims.lm_layers * opt_layer_saved_bytes(
            b, s, dims.lm_hidden, dims.lm_ffn, dims.lm_heads, e, dims.lm_dropout, lora_layer, r, lora_dropout
        )
        if "lm" in comps and dims.lm_layers and model_cfg.full_finetune:
            # Fully trained LM linears keep their inputs too (about 3 more b*s*h tensors and fc2's).
            full_lm += dims.lm_layers * 3 * e.lin * b * s * dims.lm_hidden
        if ckpt:
            per_layer = full_lm // max(dims.lm_layers, 1)
            total += dims.lm_layers * e.res * b * s * dims.lm_hidden + per_layer
        else:
            total += full_lm
            if not comps & {"projection", "qformer", "vision"}:
                # The first layer's input (the frozen embeddings) needs no gradient: its first layer
                # norm keeps nothing, nor do the LoRA dropouts reading that norm's output.
                tokens = b * s
                total -= e.res * tokens * dims.lm_hidden + 8 * tokens
                if lora_dropout > 0:
                    total -= sum(
                        e.mask_lora * tokens * d
                        for name, d in lora_layer
                        if name in ("q_proj", "k_proj", "v_proj")
                    )
        total += e.res * b * s * dims.lm_hidden  # final layer norm input
        autocast_dtype = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision)
        if autocast_dtype and model_cfg.quantization == "none" and model_cfg.precision != autocast_dtype:
            # Autocast casts every frozen weight to 16 bits for its matmul and autograd keeps that copy
            # (the input's gradient needs it): a 16-bit copy of the LM's linears and lm_head per step.
            lm_linear = dims.lm_layers * (4 * dims.lm_hidden**2 + 2 * dims.lm_hidden * dims.lm_ffn)
            total += 2 * (lm_linear + dims.vocab * dims.lm_hidden)
    vis_e = 4 if model_cfg.precision == "fp32" or model_cfg.quantization != "none" else 2
    if comps & {"qformer", "vision"}:
        nq = dims.num_query_tokens
        qf_train = "qformer" in comps
        layer = encoder_layer_saved_bytes(
            b, nq, dims.qf_hidden, dims.qf_ffn, dims.qf_heads, 4, qf_train
        )  # the Q-Former runs in fp32
        cross = dims.qf_layers // max(dims.qf_cross_every, 1)
        # Cross-attention keys and values over the image tokens (and their input, kept once).
        cross_kv = (
            cross * 2 * 4 * b * dims.vit_tokens * dims.qf_hidden + 4 * b * dims.vit_tokens * dims.vit_hidden
        )
        qf_total = dims.qf_layers * layer + cross_kv
        total += (
            qf_total
            if not ckpt
            else qf_total // max(dims.qf_layers, 1) + dims.qf_layers * 4 * b * nq * dims.qf_hidden
        )
    if "vision" in comps:
        layer = encoder_layer_saved_bytes(
            b, dims.vit_tokens, dims.vit_hidden, dims.vit_ffn, dims.vit_heads, vis_e, True
        )
        if ckpt:
            total += dims.vit_layers * vis_e * b * dims.vit_tokens * dims.vit_hidden + layer
        else:
            total += dims.vit_layers * layer
    logits = 0
    if comps:
        logit_elems = b * s * dims.vocab
        logits = int((e.lin + 4 + 4 + 4) * logit_elems)
    return int(total), logits


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@dataclass
class Flops:
    """FLOPs of one training sample, split by where they go."""

    vision_fwd: float
    qformer_fwd: float
    lm_fwd: float
    lm_bwd: float
    qformer_bwd: float
    vision_bwd: float
    recompute: float

    @property
    def model(self) -> float:
        """Forward + backward, no recomputation: what MFU counts."""
        return (
            self.vision_fwd
            + self.qformer_fwd
            + self.lm_fwd
            + self.lm_bwd
            + self.qformer_bwd
            + self.vision_bwd
        )

    @property
    def hardware(self) -> float:
        """What the GPU really executes (adds the checkpointing recomputation)."""
        return self.model + self.recompute


def _encoder_fwd(n: int, h: int, f: int, layers: int) -> float:
    return layers * (2 * n * (4 * h * h + 2 * h * f) + 4 * n * n * h)


def train_flops_per_sample(dims: Dims, trainable: Trainable, model_cfg: Any, s: float) -> Flops:
    """FLOPs for one sample of LM length ``s``.

    Why not 6 x N: that rule assumes every weight gets a weight gradient. With LoRA the base weights are
    frozen, so the backward pass through a frozen linear computes only the input gradient (one matmul
    of the forward's size, not two), and nothing at all runs backward below the lowest trainable part
    (the frozen ViT and Q-Former only run forward). So:

    * forward: 2 x (multiply-adds) of every matmul: ViT on 257 tokens, Q-Former on 32 queries (cross-
      attention keys/values on the image tokens), the projection, the LM on ``s`` tokens incl. the
      attention products (4 x s^2 x h per layer) and the lm_head (2 x s x h x vocab);
    * backward through the LM: input gradients = the LM forward again, plus weight gradients of
      trained weights (LoRA: 2 x 2 x r x (in + out) x s per target, negligible; full training: the
      forward again), attention backward = 2 x its forward;
    * with gradient checkpointing, the LM layers' forward runs once more (counted in ``hardware``).
    """
    comps = trainable.grad_components
    vision = dims.vit_patch_flops + _encoder_fwd(
        dims.vit_tokens, dims.vit_hidden, dims.vit_ffn, dims.vit_layers
    )
    nq, hq = dims.num_query_tokens, dims.qf_hidden
    cross = dims.qf_layers // max(dims.qf_cross_every, 1)
    qformer = _encoder_fwd(nq, hq, dims.qf_ffn, dims.qf_layers)
    qformer += cross * (
        2 * nq * 2 * hq * hq + 2 * dims.vit_tokens * 2 * dims.vit_hidden * hq + 4 * nq * dims.vit_tokens * hq
    )
    qformer += 2 * nq * hq * dims.lm_hidden  # language projection
    h, f, L = dims.lm_hidden, dims.lm_ffn, dims.lm_layers
    layers_fwd = L * (2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h)
    lm_fwd = layers_fwd + 2 * s * h * dims.vocab
    lm_bwd = qf_bwd = vis_bwd = 0.0
    if comps:
        attn = L * 4 * s * s * h
        lm_bwd = lm_fwd + attn  # input grads (= forward) + attention backward's second product
        for _, fin, fout in trainable.adapter_targets:
            lm_bwd += 3 * 2 * model_cfg.peft.r * (fin + fout) * (s if _component(_) == "lm" else nq)
        if model_cfg.full_finetune:
            lm_bwd += layers_fwd
    if comps & {"qformer", "vision"}:
        qf_bwd = 2 * qformer if "qformer" in comps else qformer
    if "vision" in comps:
        vis_bwd = 2 * vision
    recompute = layers_fwd if model_cfg.gradient_checkpointing and comps else 0.0
    return Flops(vision, qformer, lm_fwd, lm_bwd, qf_bwd, vis_bwd, recompute)


# ---------------------------------------------------------------------------------------------
# Sequence lengths and the dataset size
# ---------------------------------------------------------------------------------------------

#: ROCOv2 train images (FACTS 1): all, and stored-RGB as the original project kept them.
ROCOV2_TRAIN = {"all": 59_958, "stored-rgb": 37_330}
SHARED_VALID_CAPTIONS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "rocov2-valid" / "valid_captions.csv"
)


def _caption_lengths(run_cfg: Any, tokenizer: Any) -> tuple[list[int], str]:
    """Caption token counts: the config's training manifest if prepared, else the real ROCOv2
    validation captions shipped beside the repo, else none."""
    manifest = run_cfg.data.manifest(run_cfg.data.train_split)
    if manifest.is_file():
        path, limit, source = manifest, run_cfg.data.max_train_samples, str(manifest)
    elif SHARED_VALID_CAPTIONS.is_file():
        path, limit, source = SHARED_VALID_CAPTIONS, None, "ROCOv2 valid caption lengths"
    else:
        return [], "no captions found"
    return list(_lengths_of(str(path), path.stat().st_mtime_ns, limit, tokenizer)), source


_LENGTH_CACHE: dict[tuple[str, int, int | None], tuple[int, ...]] = {}


def _lengths_of(path: str, mtime: int, limit: int | None, tokenizer: Any) -> tuple[int, ...]:
    """Token counts of the captions in a manifest or captions CSV, cached per file version (planning
    several GPUs or batch sizes in one process tokenizes once)."""
    from medcap.data import read_manifest

    key = (path, mtime, limit)
    if key not in _LENGTH_CACHE:
        if path.endswith("manifest.csv"):
            caps = [r.caption for r in read_manifest(path, limit)]
        else:
            with open(path, newline="", encoding="utf-8") as f:
                caps = [c for c in (r["Caption"].strip() for r in csv.DictReader(f)) if c]
        ids = tokenizer(caps, add_special_tokens=False)["input_ids"]
        _LENGTH_CACHE[key] = tuple(len(x) for x in ids)
    return _LENGTH_CACHE[key]


def sequence_lengths(run_cfg: Any, num_query_tokens: int) -> tuple[int, float, int, str]:
    """(max LM length, mean LM length, training images, where the images count came from).

    Decoder-only: query tokens + BOS + prompt tokens + caption (at most ``train.max_caption_tokens``)
    + EOS. The mean uses real caption lengths (tokenised with the shipped offline BPE, which splits
    medical words into more pieces than OPT's 50k BPE: means are upper bounds).
    """
    from medcap import model as model_lib

    tok = model_lib.offline_tokenizer("blip2-opt")
    tok.model_max_length = 1 << 30  # only counting tokens: no "longer than the maximum" warning
    prompt = (
        len(tok(run_cfg.model.prompt, add_special_tokens=False)["input_ids"]) if run_cfg.model.prompt else 0
    )
    prefix = num_query_tokens + 1 + prompt
    cap = run_cfg.train.max_caption_tokens
    max_len = prefix + cap + 1
    lengths, source = _caption_lengths(run_cfg, tok)
    if lengths:
        mean_cap = sum(min(n, cap) + 1 for n in lengths) / len(lengths)
    else:
        mean_cap = min(cap, 58) + 1  # ROCOv2 valid mean with the shipped tokenizer (58.1)
    manifest = run_cfg.data.manifest(run_cfg.data.train_split)
    if manifest.is_file():
        n_images, img_source = len(lengths), f"rows of {manifest}"
    else:
        n_images, img_source = ROCOV2_TRAIN["stored-rgb"], "ROCOv2 train, stored-RGB (no manifest prepared)"
    return max_len, prefix + mean_cap, n_images, img_source


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def memory_for_batch(
    b: int,
    s: int,
    dims: Dims,
    trainable: Trainable,
    weights: int,
    weights_by_kind: dict[str, int],
    model_cfg: Any,
    optimizer: str,
    mixed_precision: str,
    gpu: GpuSpec,
    gpus: int,
    device: str,
) -> MemoryBreakdown:
    """The memory breakdown for micro-batch ``b`` at sequence length ``s``."""
    e = act_dtypes(model_cfg, mixed_precision, device)
    acts, logits = activation_bytes(dims, trainable, model_cfg, e, b, s, mixed_precision)
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


def plan(
    run_cfg: Any,
    gpu: str,
    gpus: int = 1,
    batch_size: int | None = None,
    utilisation: float | None = None,
    config_name: str = "config",
) -> Plan:
    """Plan ``run_cfg`` (a ``RunConfig``) on ``gpus`` GPUs of type ``gpu`` (a key of ``GPUS``)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    spec = GPUS[gpu]
    mc = run_cfg.model
    tc = run_cfg.train
    b = batch_size or tc.batch_size
    model, family = meta_model(mc)
    dims = _dims(model, family)
    weights, by_kind = weight_bytes(model, mc)
    trainable = trainable_parameters(model, mc, family)
    total_params = sum(p.numel() for p in model.parameters())
    trainable_total = trainable.total
    s_max, s_mean, n_images, img_source = sequence_lengths(run_cfg, dims.num_query_tokens)
    device = "cpu" if gpu == "cpu" else "cuda"
    mp = tc.mixed_precision

    def mem(batch: int) -> MemoryBreakdown:
        return memory_for_batch(
            batch, s_max, dims, trainable, weights, by_kind, mc, tc.optimizer, mp, spec, gpus, device
        )

    breakdown = mem(b)
    fits = breakdown.total <= spec.memory_bytes
    lo, hi = 0, 1
    while hi <= 1 << 14 and mem(hi).total <= spec.memory_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mem(mid).total <= spec.memory_bytes else (lo, mid)
    max_b = lo

    warnings: list[str] = []
    compute16 = {"bf16", "fp16"} & {mc.precision, mp, mc.compute_dtype}
    uses_bf16 = "bf16" in compute16
    if uses_bf16 and spec.bf16_tflops is None:
        warnings.append(
            f"{spec.name} has no bf16 tensor cores: bf16 runs far slower there (or fails). Use "
            "model.precision fp16 (the Q-Former stays fp32) with train.mixed_precision fp16"
        )
        peak = spec.fp32_tflops
    elif compute16:
        peak = spec.bf16_tflops if uses_bf16 else spec.fp16_tflops
    else:
        peak = spec.fp32_tflops
        warnings.append("fp32 weights without mixed precision: no tensor cores (set train.mixed_precision)")
    if (
        mc.quantization != "none"
        and device == "cuda"
        and gpu in ("v100-16", "v100-32")
        and mc.quantization == "8bit"
    ):
        warnings.append(
            "LLM.int8 needs int8 tensor cores (Turing or newer); the V100 falls back to slow paths"
        )
    if mp == "fp16" and not (mc.quantization != "none" or mc.precision == "fp32"):
        warnings.append(
            "fp16 autocast over fp16 weights: the gradient scaler cannot unscale fp16 gradients of fp16 "
            "parameters; PEFT keeps adapters fp32, so this works for LoRA only"
        )
    if not fits:
        warnings.append(
            f"does not fit: {breakdown.total / GIB:.1f} GiB > {spec.memory_mib / 1024:.1f} GiB. Try "
            + ", ".join(
                x
                for x in (
                    f"train.batch_size {max_b} with train.grad_accum {math.ceil(b / max(max_b, 1))}"
                    if max_b
                    else "",
                    "model.gradient_checkpointing true" if not mc.gradient_checkpointing else "",
                    "model.quantization 4bit (QLoRA)" if mc.quantization == "none" else "",
                )
                if x
            )
        )
    util = utilisation if utilisation is not None else DEFAULT_MFU[mc.quantization]
    flops = train_flops_per_sample(dims, trainable, mc, s_mean)
    epoch_s = n_images * flops.hardware / (gpus * peak * 1e12 * util)
    peft_desc = f"{mc.peft.method} r={mc.peft.r} on {mc.peft.targets}" if mc.peft.method != "none" else "none"
    extra = [
        n
        for n, on in (
            ("Q-Former", mc.train_qformer),
            ("vision", mc.train_vision),
            ("projection", mc.train_language_projection),
            ("everything", mc.full_finetune),
        )
        if on
    ]
    if extra:
        peft_desc += " + full " + ", ".join(extra)
    return Plan(
        config=config_name,
        model=mc.name_or_path,
        gpu=gpu,
        gpu_spec=spec,
        gpus=gpus,
        batch_size=b,
        seq_len_max=s_max,
        seq_len_mean=s_mean,
        precision=mc.precision,
        mixed_precision=mp,
        quantization=mc.quantization,
        peft=peft_desc,
        gradient_checkpointing=mc.gradient_checkpointing,
        optimizer=tc.optimizer,
        total_params=total_params,
        trainable_params=trainable_total,
        memory=breakdown,
        fits=fits,
        max_batch_size=max_b,
        train_flops_per_sample=flops.hardware,
        model_flops_per_sample=flops.model,
        vision_flops_per_sample=flops.vision_fwd + flops.qformer_fwd,
        peak_tflops=peak,
        utilisation=util,
        train_images=n_images,
        train_images_source=img_source,
        epoch_seconds=epoch_s,
        warnings=warnings,
    )


def cli(argv: list[str]) -> int:
    """``medcap plan --config CONFIG --gpu t4|v100-16|v100-32|a10|a100-40|a100-80|h100 [--gpus N]``."""
    from medcap.config import ConfigError
    from medcap.train import load_run_config

    p = argparse.ArgumentParser(
        prog="medcap plan",
        description="Will this config fit a GPU? Memory per GPU (weights, adapters, gradients, optimizer, "
        "activations, overhead), the largest micro-batch that fits and the time of an epoch. Builds the "
        "model on the meta device: no weights, no download. Any setting can be overridden with "
        "--section.key VALUE.",
    )
    p.add_argument("--config", type=Path, help="run config YAML (configs/*.yaml)")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS), help="GPU type ('cpu': this machine's RAM)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel); default 1")
    p.add_argument("--batch-size", type=int, help="micro-batch per GPU (default: train.batch_size)")
    p.add_argument(
        "--utilisation",
        type=float,
        help="achieved fraction of the peak rate for the epoch time (default 0.40; x0.6 for 4-bit, x0.25 "
        "for 8-bit weights)",
    )
    p.add_argument("--json", type=Path, help="also write the plan as JSON here")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = load_run_config(args.config, rest)
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.utilisation is not None and not 0 < args.utilisation <= 1:
            raise ConfigError(f"--utilisation must be in (0, 1], got {args.utilisation}")
        result = plan(
            cfg,
            args.gpu,
            args.gpus,
            args.batch_size,
            args.utilisation,
            config_name=str(args.config) if args.config else "defaults",
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"medcap plan: {e}", file=sys.stderr)
        return 2
    print(result.report())
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=1, default=str), encoding="utf-8")
    return 0
