"""Which model to build and which of its parameters train (the ``model`` section of a run config).

Plain settings, checked when loaded; no torch. Family-specific names (the LoRA target presets, the
families themselves) are checked against the family registry (``medcap.model.families``), which is
light to import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from medcap.config.loader import ConfigError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning: which method, its size, and where it lands."""

    method: Literal["none", "lora", "dora", "rslora", "ia3"] = "lora"
    """none | lora | dora | rslora | ia3. QLoRA is ``lora`` with ``model.quantization: 4bit``."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha (scaling alpha / r, or alpha / sqrt(r) for rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: str | list[str] = "lm-qv"
    """A preset expression of the model family, such as ``lm-qv`` (the language model's q,v: PEFT's
    default and the original project's), ``lm-attn`` (q,k,v,out), ``lm-all`` (all linears of the
    LANGUAGE MODEL ONLY), ``vision`` (the vision tower's linears), ``projector`` (the vision-to-language
    projector), ``qformer-qv``, ``qformer-attn`` (BLIP-2's and InstructBLIP's Q-Former), combined with ``+``
    (``lm-all+qformer-attn``); or a list of module names passed to PEFT as they are (PEFT matches a
    name anywhere: ``fc1`` reaches the vision tower too). ``medcap train --dry-run`` prints what matched."""

    def __post_init__(self) -> None:
        from medcap.model.families import preset_names

        if self.r < 1:
            raise ConfigError(f"peft.r: must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"peft.alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and "," in self.targets:
            # From the command line "--model.peft.targets q_proj,v_proj" arrives as one string.
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, str):
            names = [t.strip() for t in self.targets.split("+")]
            known = sorted(preset_names())
            bad = [n for n in names if n not in known]
            if bad:
                raise ConfigError(
                    f"peft.targets: unknown preset {', '.join(map(repr, bad))}; presets are "
                    f"{', '.join(known)} (join with '+'), or give a list of module names"
                )
        elif not self.targets:
            raise ConfigError("peft.targets: the list of module names is empty")


@dataclass
class ModelConfig:
    """Which model to build, in which precision, and which of its parameters train."""

    name_or_path: str = "Salesforce/blip2-opt-6.7b"
    """A hub id (``Salesforce/blip2-opt-6.7b``, ``Qwen/Qwen2.5-VL-7B-Instruct``,
    ``llava-hf/llava-v1.6-mistral-7b-hf``, ``google/paligemma2-3b-pt-224``, ``google/medgemma-4b-it``,
    ``HuggingFaceTB/SmolVLM-Instruct``, ``Salesforce/instructblip-vicuna-7b`` ...), a local folder
    holding config.json (+ weights), or a built-in tiny model of a family (``tiny``: BLIP-2 with OPT,
    ``tiny-t5``: BLIP-2 with T5, ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``, ``tiny-llava-next``,
    ``tiny-paligemma``, ``tiny-gemma3``, ``tiny-idefics3``, ``tiny-instructblip``,
    ``tiny-instructblip-t5``)."""
    family: str = "auto"
    """Model family (``medcap.model.families``: blip2-opt, blip2-t5, qwen2.5-vl, qwen3-vl, llava-next,
    paligemma, gemma3, idefics3, instructblip, instructblip-t5); ``auto`` reads it from the model's
    config.json or the hub id."""
    random_init: bool = False
    """Build the architecture with random weights instead of loading them: no hub needed for the
    shipped configs. For dry runs, benchmarks and memory checks."""
    init_seed: int = 0
    """Seed of the random weights (random_init and tiny models), so a checkpoint can rebuild them."""
    precision: Precision = "fp32"
    """Weight dtype. Parts the family keeps in fp32 (BLIP-2's Q-Former and query tokens, as
    transformers does) stay fp32 to avoid NaNs."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes weight quantization of the linear layers: 8-bit (LLM.int8) or 4-bit NF4 with
    double quantization (QLoRA)."""
    compute_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Compute dtype of 4-bit layers; ``auto`` takes ``precision`` (fp32 when precision is fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, works with LoRA) to save memory."""
    prompt: str = ""
    """Text the caption follows (LAVIS used "a photo of "); empty by default. It is masked out of the
    loss and given again at generation time."""
    image_size: int | None = None
    """Input image size in pixels (overrides the config's; position embeddings are interpolated).
    BLIP-2 and InstructBLIP only; the other families read images at their own sizes."""
    min_pixels: int | None = None
    """Dynamic-resolution families (Qwen2.5-VL, Qwen3-VL): the fewest pixels an image is resized to
    (smaller images are scaled up, keeping the aspect ratio); null: the model's own setting."""
    max_pixels: int | None = None
    """Dynamic-resolution families: the most pixels an image is resized to (larger ones are scaled
    down, keeping the aspect ratio). The number of visual tokens, and with it the activation memory,
    follows it: Qwen2.5-VL makes one token per 28 x 28 pixels (Qwen3-VL 32 x 32), so 401,408 pixels
    (512 tokens) is a common training cap, while the model's own 12.8M allow 16,384 tokens, the
    usual out-of-memory cause. Idefics3 / SmolVLM: the resized image's longest edge is at most
    sqrt(max_pixels), rounded down to whole tiles (fewer tiles, fewer image tokens). Null: the
    model's own setting. Training, predict and the service all use the same bound."""
    peft: PeftSettings = field(default_factory=PeftSettings)
    """Parameter-efficient fine-tuning."""
    train_qformer: bool = False
    """Train the whole Q-Former and the query tokens (BLIP-2's own caption fine-tune does)."""
    train_vision: bool = False
    """Train the whole vision tower (BLIP-2's own caption fine-tune does; costs memory)."""
    train_language_projection: bool = False
    """Train the projection from the vision side to the language model."""
    full_finetune: bool = False
    """Train every parameter (for the tiny demo model; requires peft.method none)."""
    cpu_fp32_matmul: Literal["auto", "on", "off"] = "auto"
    """On a CPU, run the frozen linear layers of a bf16/fp16 model in fp32 (weights stay stored in
    bf16/fp16, upcast one layer at a time). ``auto``: only where the CPU has no native bf16/fp16
    matrix product (no AVX512-BF16/AMX), where PyTorch's bf16 backward product runs ~100x slower
    than fp32. No effect on a GPU."""

    def __post_init__(self) -> None:
        from medcap.model.families import family_names

        if self.family != "auto" and self.family not in family_names():
            raise ConfigError(
                f"model.family: {self.family!r} is not a supported family; supported: "
                f"auto, {', '.join(family_names())}"
            )
        if "<image>" in self.prompt:
            raise ConfigError(
                "model.prompt must not contain '<image>': the processor inserts the image tokens"
            )
        if not self.name_or_path.strip():
            raise ConfigError("model.name_or_path: empty; give a hub id, a local folder or 'tiny'")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name}: must be a positive number of pixels, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"model.min_pixels {self.min_pixels} is more than model.max_pixels {self.max_pixels}"
            )
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"model.image_size: {self.image_size} px is too small (at least 16)")
        if self.full_finetune and self.peft.method != "none":
            raise ConfigError(
                "model.full_finetune trains every parameter; set model.peft.method: none "
                f"(it is {self.peft.method!r})"
            )
        if self.full_finetune and self.quantization != "none":
            raise ConfigError("model.full_finetune cannot train quantized weights; set quantization: none")
        if (
            self.quantization != "none"
            and self.peft.method == "none"
            and not (self.train_qformer or self.train_language_projection)
        ):
            raise ConfigError(
                f"model.quantization {self.quantization} freezes the quantized weights: use a PEFT method "
                "(peft.method: lora is QLoRA with 4bit) or train the Q-Former / projection"
            )
        if self.quantization != "none" and self.train_vision:
            raise ConfigError(
                "model.train_vision with quantization: the vision tower's linears are quantized and cannot "
                "train; use quantization: none or train_vision: false"
            )
        if (
            self.train_qformer
            and self.peft.method != "none"
            and isinstance(self.peft.targets, str)
            and "qformer" in self.peft.targets
        ):
            raise ConfigError(
                f"model.train_qformer trains the whole Q-Former, and peft.targets {self.peft.targets!r} "
                "also puts adapters on it: choose one"
            )
        if not (
            self.full_finetune
            or self.peft.method != "none"
            or self.train_qformer
            or self.train_vision
            or self.train_language_projection
        ):
            log.warning("model: nothing trains (peft.method none and no train_* flag); fine for inference")


__all__ = ["ModelConfig", "PeftSettings", "Precision"]
