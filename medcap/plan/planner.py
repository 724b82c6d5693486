"""planner"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.model.family import ModelFamily
from medcap.plan.gpus import DEFAULT_MFU, GIB, GPUS, GpuSpec
from medcap.plan.memory import MemoryBreakdown, memory_for_batch, trainable_parameters, weight_bytes

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig
    from medcap.config.run import RunConfig


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
            f"at most (image tokens + template + prompt + caption cap + end), {self.seq_len_mean:.1f} on average",
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


def meta_model(model_cfg: ModelConfig) -> tuple[Any, ModelFamily]:
    """``(model, family)``: the model of ``model_cfg`` with every parameter on the meta device.

    Dtypes follow ``build_model`` (``precision``, the family's fp32 parts in fp32). No PEFT is applied
    (the planner counts adapters from the matched module shapes). Needs the architecture's config
    without the hub: a tiny model, a shipped config or a local folder.
    """
    from medcap.model.families import config_json, resolve_family
    from medcap.model.quantize import DTYPES
    from medcap.model.random_init import meta_model as build_meta

    family = resolve_family(model_cfg)
    if model_cfg.name_or_path not in family.tiny_names and config_json(model_cfg.name_or_path)[1] is None:
        raise FileNotFoundError(
            f"model.name_or_path {model_cfg.name_or_path!r}: no config.json here to plan from; the planner "
            "needs a shipped config (medcap/model/assets), a tiny model or a local folder"
        )
    config = family.architecture(model_cfg, family.offline_tokenizer())
    model = build_meta(family.model_class(), config, DTYPES[model_cfg.precision], family.fp32_prefixes)
    return model, family


#: ROCOv2 train images (FACTS 1): all, and stored-RGB as the original project kept them.
ROCOV2_TRAIN = {"all": 59_958, "stored-rgb": 37_330}

SHARED_VALID_CAPTIONS = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "rocov2-valid" / "valid_captions.csv"
)


def _caption_lengths(run_cfg: RunConfig, tokenizer: Any) -> tuple[list[int], str]:
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
    from medcap.data.manifest import read_manifest

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


def sequence_lengths(
    run_cfg: RunConfig, prefix_tokens: int, end_tokens: int, tokenizer: Any
) -> tuple[int, float, int, str]:
    """(max LM length, mean LM length, training images, where the images count came from).

    Decoder-only: the prefix (image tokens, template, prompt: ``prefix_tokens``, the family's plan
    spec measures it) + caption (at most ``train.max_caption_tokens``) + ``end_tokens``. The mean
    uses real caption lengths (tokenised with the shipped offline BPE, which splits medical words
    into more pieces than the models' own 32k-256k vocabularies: means are upper bounds).
    """
    tok = tokenizer
    tok.model_max_length = 1 << 30  # only counting tokens: no "longer than the maximum" warning
    cap = run_cfg.train.max_caption_tokens
    max_len = prefix_tokens + cap + end_tokens
    lengths, source = _caption_lengths(run_cfg, tok)
    if lengths:
        mean_cap = sum(min(n, cap) + end_tokens for n in lengths) / len(lengths)
    else:
        mean_cap = min(cap, 58) + end_tokens  # ROCOv2 valid mean with the shipped tokenizer (58.1)
    manifest = run_cfg.data.manifest(run_cfg.data.train_split)
    if manifest.is_file():
        n_images, img_source = len(lengths), f"rows of {manifest}"
    else:
        n_images, img_source = ROCOV2_TRAIN["stored-rgb"], "ROCOv2 train, stored-RGB (no manifest prepared)"
    return max_len, prefix_tokens + mean_cap, n_images, img_source


def plan(
    run_cfg: RunConfig,
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
    gpu_spec = GPUS[gpu]
    mc = run_cfg.model
    tc = run_cfg.train
    b = batch_size or tc.batch_size
    model, family = meta_model(mc)
    spec = family.plan_spec(model)
    weights, by_kind = weight_bytes(model, mc, family)
    trainable = trainable_parameters(model, mc, family)
    total_params = sum(p.numel() for p in model.parameters())
    trainable_total = trainable.total
    s_max, s_mean, n_images, img_source = sequence_lengths(
        run_cfg, spec.prefix_tokens(mc), spec.end_tokens(mc), family.offline_tokenizer()
    )
    device = "cpu" if gpu == "cpu" else "cuda"
    mp = tc.mixed_precision

    def mem(batch: int) -> MemoryBreakdown:
        return memory_for_batch(
            batch, s_max, spec, trainable, weights, by_kind, mc, tc.optimizer, mp, gpu_spec, gpus, device
        )

    breakdown = mem(b)
    fits = breakdown.total <= gpu_spec.memory_bytes
    lo, hi = 0, 1
    while hi <= 1 << 14 and mem(hi).total <= gpu_spec.memory_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mem(mid).total <= gpu_spec.memory_bytes else (lo, mid)
    max_b = lo

    warnings: list[str] = []
    compute16 = {"bf16", "fp16"} & {mc.precision, mp, mc.compute_dtype}
    uses_bf16 = "bf16" in compute16
    if uses_bf16 and gpu_spec.bf16_tflops is None:
        warnings.append(
            f"{gpu_spec.name} has no bf16 tensor cores: bf16 runs far slower there (or fails). Use "
            "model.precision fp16 (the Q-Former stays fp32) with train.mixed_precision fp16"
        )
        peak = gpu_spec.fp32_tflops
    elif compute16:
        peak = gpu_spec.bf16_tflops if uses_bf16 else gpu_spec.fp16_tflops
    else:
        peak = gpu_spec.fp32_tflops
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
            f"does not fit: {breakdown.total / GIB:.1f} GiB > {gpu_spec.memory_mib / 1024:.1f} GiB. Try "
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
    flops = spec.flops(trainable, mc, s_mean)
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
        gpu_spec=gpu_spec,
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
        vision_flops_per_sample=flops.vision_fwd + flops.connector_fwd,
        peak_tflops=peak,
        utilisation=util,
        train_images=n_images,
        train_images_source=img_source,
        epoch_seconds=epoch_s,
        warnings=warnings,
    )
