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


#: The PEFT methods medcap builds through peft (``model.peft.method``).
PeftMethod = Literal["none", "lora", "dora", "rslora", "ia3", "vera", "adalora", "oft", "boft"]

#: The methods whose adapter is a LoRA pair (A, B): what ``model.peft.init`` and LoRA+ apply to.
LORA_METHODS = ("lora", "dora", "rslora")

#: LoRA initialisations (``model.peft.init``); all are peft's ``init_lora_weights`` values.
PeftInit = Literal["default", "pissa", "olora", "eva", "corda", "loftq"]

#: Inits that rewrite the base weights (W -> W - scale * B0 A0, peft's "residual" model).
BASE_REWRITING_INITS = ("pissa", "olora", "corda")

#: Inits that read training data before training starts.
DATA_DRIVEN_INITS = ("eva", "corda")


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning: which method, its size, and where it lands.

    Every method is peft's own (``medcap.model.peft_methods`` builds the peft config); docs/PERFORMANCE.md
    compares them on the same task (benchmarks/bench_peft.py)."""

    method: PeftMethod = "lora"
    """none | lora | dora | rslora | ia3 | vera | adalora | oft | boft. QLoRA is ``lora`` with
    ``model.quantization: 4bit``. vera: shared frozen random projections, only two scaling vectors
    per layer train (``r`` is the projections' rank; VeRA's paper uses 256 and more). adalora: starts
    at rank ``r`` and prunes to an average of ``adalora_target_r`` during training (its schedule
    follows the run's optimizer steps). oft / boft: orthogonal (butterfly) rotations of each layer's
    input, block size ``block_size``."""
    init: PeftInit = "default"
    """How the LoRA matrices start (lora, dora, rslora only): default (B = 0, A random), pissa (A, B
    from the weight's top singular vectors; the base keeps the rest), olora (QR of the weight), eva
    (A from the SVD of the layer inputs on ``init_batches`` training batches; ranks redistributed
    by explained variance), corda (context-oriented SVD from the input covariance on ``init_batches``
    training batches), loftq (4-bit only: A, B that cancel the quantization error; needs a CUDA GPU).
    pissa, olora and corda rewrite the adapted base weights; the checkpoint stores the initial
    adapter so that the base is restored exactly, and an unmerged export is converted to a plain
    LoRA of rank 2r on the original base (peft's conversion)."""
    r: int = 16
    """Rank: LoRA's and its variants' rank; AdaLoRA's initial rank; VeRA's projection rank."""
    alpha: float = 32.0
    """LoRA alpha (scaling alpha / r, or alpha / sqrt(r) for rslora); also AdaLoRA's."""
    dropout: float = 0.05
    """Dropout on the adapter input (LoRA, AdaLoRA, VeRA) or of whole rotation blocks (OFT, BOFT)."""
    targets: str | list[str] = "lm-qv"
    """A preset expression of the model family, such as ``lm-qv`` (the language model's q,v: PEFT's
    default and the original project's), ``lm-attn`` (q,k,v,out), ``lm-all`` (all linears of the
    LANGUAGE MODEL ONLY), ``vision`` (the vision tower's linears), ``projector`` (the vision-to-language
    projector), ``qformer-qv``, ``qformer-attn`` (BLIP-2's and InstructBLIP's Q-Former), combined with ``+``
    (``lm-all+qformer-attn``); or a list of module names passed to PEFT as they are (PEFT matches a
    name anywhere: ``fc1`` reaches the vision tower too). ``medcap train --dry-run`` prints what matched.
    A preset the model's family lacks is refused when the config loads, naming the family's presets."""
    train_norms: bool = False
    """Also train the normalisation layers (LayerNorm, RMSNorm) inside the blocks that hold an adapter,
    through peft's ``modules_to_save`` (saved with the adapter, merged on export)."""
    pissa_iters: int | None = None
    """init pissa: subspace iterations of a fast randomized SVD (peft's ``pissa_niter_N``; 16 does a
    7B model in seconds); null: the exact SVD."""
    init_batches: int = 16
    """init eva / corda: training batches (of ``train.batch_size``) the statistics come from; cached
    in RUN/peft_init/ and reused while the data and settings match."""
    eva_rho: float = 2.0
    """init eva: each layer may end with up to rho x r ranks (the budget r x layers is redistributed by
    explained variance); 1 keeps every layer at r."""
    eva_tau: float = 0.99
    """init eva: the SVD of a layer has converged when its components' cosine similarity between two
    batches reaches tau."""
    corda_mode: Literal["ipm", "kpm"] = "ipm"
    """init corda: ipm (instruction-previewed: adapt the directions the data uses most, fastest to
    learn) or kpm (knowledge-preserved: adapt the ones it uses least)."""
    adalora_target_r: int = 8
    """adalora: the average rank left per layer after pruning (it starts at ``r``)."""
    adalora_warmup: float = 0.1
    """adalora: share of the run's optimizer steps before pruning starts (peft's tinit)."""
    adalora_final: float = 0.2
    """adalora: share of the run's optimizer steps at the end with the final ranks fixed (peft's tfinal)."""
    adalora_interval: int = 10
    """adalora: optimizer steps between two rank allocations (peft's deltaT)."""
    adalora_orth_reg: float = 0.5
    """adalora: weight of the orthogonality penalty on its P and Q matrices."""
    block_size: int = 16
    """oft / boft: size of the orthogonal blocks; it must divide each adapted layer's input size."""
    butterfly_factor: int = 1
    """boft: butterfly factors (1 is block-diagonal OFT; more share rotations across blocks)."""

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
        self._check_method_settings()

    def _check_method_settings(self) -> None:
        """The settings of one method must not be set for another, and must be in range."""
        if self.init != "default" and self.method not in LORA_METHODS:
            raise ConfigError(
                f"peft.init {self.init} is a LoRA initialisation; method {self.method} has no LoRA matrices. "
                f"Use method {', '.join(LORA_METHODS)} with init {self.init}, or init default"
            )
        if self.pissa_iters is not None and (self.init != "pissa" or self.pissa_iters < 0):
            raise ConfigError(
                f"peft.pissa_iters {self.pissa_iters}: only for init pissa, and at least 0; set peft.init pissa "
                "with it, or unset it (null: the exact SVD)"
            )
        if self.init == "loftq" and self.method == "dora":
            raise ConfigError(
                "peft.init loftq with method dora: peft sets LoftQ's A and B after DoRA has fixed its "
                "magnitudes from the quantized weights alone, so the start would not match the full-precision "
                "model; use method lora or rslora with loftq, or dora with init default"
            )
        if self.init == "loftq":
            scaling = self.alpha / (self.r**0.5 if self.method == "rslora" else self.r)
            if abs(scaling - 1.0) > 1e-9:
                want = f"{self.r**0.5:g} (sqrt(r))" if self.method == "rslora" else f"{self.r} (= r)"
                raise ConfigError(
                    f"peft.init loftq with alpha {self.alpha:g} and r {self.r}: peft sets LoftQ's A and B without "
                    f"the LoRA scaling, so the adapter cancels the quantization error only at scaling 1 (it is "
                    f"{scaling:g}); set peft.alpha to {want}"
                )
        if self.init_batches < 1:
            raise ConfigError(f"peft.init_batches must be at least 1, got {self.init_batches}")
        if self.eva_rho < 1:
            raise ConfigError(f"peft.eva_rho must be at least 1 (1: no redistribution), got {self.eva_rho}")
        if not 0 < self.eva_tau <= 1:
            raise ConfigError(f"peft.eva_tau must be in (0, 1], got {self.eva_tau}")
        if self.method == "adalora":
            if not 1 <= self.adalora_target_r <= self.r:
                raise ConfigError(
                    f"peft.adalora_target_r {self.adalora_target_r}: AdaLoRA prunes from r={self.r} down to it, "
                    "so it must be between 1 and peft.r"
                )
            if not (0 <= self.adalora_warmup < 1 and 0 <= self.adalora_final < 1):
                raise ConfigError(
                    "peft.adalora_warmup and peft.adalora_final are shares of the steps, in [0, 1)"
                )
            if self.adalora_warmup + self.adalora_final >= 1:
                raise ConfigError(
                    f"peft.adalora_warmup {self.adalora_warmup} + peft.adalora_final {self.adalora_final} leave "
                    "no steps to allocate ranks in; keep their sum below 1 (e.g. 0.1 and 0.2)"
                )
            if self.adalora_interval < 1 or self.adalora_orth_reg < 0:
                raise ConfigError(
                    "peft.adalora_interval must be at least 1 and peft.adalora_orth_reg at least 0"
                )
        if self.block_size < 1 or self.butterfly_factor < 1:
            raise ConfigError("peft.block_size and peft.butterfly_factor must be at least 1")
        if self.train_norms and self.method == "none":
            raise ConfigError(
                "peft.train_norms trains norm layers next to an adapter (peft's modules_to_save); "
                "choose a peft.method, or model.full_finetune to train everything"
            )


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
        self._check_peft_quantization()
        self._check_family_parts()
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

    def _check_family_parts(self) -> None:
        """Refuse target presets and ``train_*`` flags that the model's family does not have (BLIP-2's
        ``qformer-qv`` on Qwen-VL, ``projector`` on Gemma 3, whose projector is no linear layer), naming
        what the family has. Checked when the family is known without the hub (a tiny name, a local
        folder, a shipped hub id); otherwise the build checks the same."""
        from medcap.model.families import resolve_family
        from medcap.model.family import TRAIN_FLAGS

        try:
            family = resolve_family(self)
        except ConfigError:
            return  # an unknown model: build_model says which families exist
        if self.peft.method != "none" and isinstance(self.peft.targets, str):
            names = [n.strip() for n in self.peft.targets.split("+")]
            missing = [n for n in names if n not in family.target_presets]
            if missing:
                raise ConfigError(
                    f"model.peft.targets {self.peft.targets!r}: {', '.join(map(repr, missing))} is not a preset of "
                    f"the {family.name} family ({family.description}); its presets are "
                    f"{', '.join(family.target_presets)} (join with '+'), or give a list of module names"
                )
        for flag, part in TRAIN_FLAGS.items():
            if getattr(self, flag) and not family.parts.get(part):
                has = [f"model.{f} ({p})" for f, p in TRAIN_FLAGS.items() if family.parts.get(p)]
                raise ConfigError(
                    f"model.{flag}: the {family.name} family has no {part}; unset it. It can train "
                    f"{', '.join(has) or 'no whole part'}, or adapters through model.peft.targets "
                    f"({', '.join(family.target_presets)})"
                )

    def _check_peft_quantization(self) -> None:
        """Refuse LoRA initialisations that the quantization cannot take, saying what works instead."""
        init, quant = self.peft.init, self.quantization
        if init in ("pissa", "corda") and quant != "none":
            raise ConfigError(
                f"model.peft.init {init} with quantization {quant}: {init} computes the residual weights "
                "W - scale * B A from full-precision weights (peft refuses quantized ones). With 4-bit use "
                "init loftq (the quantization-aware init) or default; for pissa/corda set quantization none"
            )
        if init == "olora" and quant != "none":
            raise ConfigError(
                f"model.peft.init olora with quantization {quant}: OLoRA re-quantizes the residual weights "
                "W - scale * B A, which medcap cannot rebuild bit for bit when it loads a checkpoint onto a "
                "freshly quantized base. With 4-bit use init loftq or default; for olora set quantization none"
            )
        if init == "loftq" and quant != "4bit":
            raise ConfigError(
                f"model.peft.init loftq with quantization {quant}: LoftQ starts LoRA so that it cancels the "
                "4-bit (NF4) quantization error, so it needs model.quantization 4bit; without 4-bit use init "
                "default or pissa"
            )


__all__ = [
    "BASE_REWRITING_INITS",
    "DATA_DRIVEN_INITS",
    "LORA_METHODS",
    "ModelConfig",
    "PeftInit",
    "PeftMethod",
    "PeftSettings",
    "Precision",
]
