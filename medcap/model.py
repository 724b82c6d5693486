"""BLIP-2 + PEFT: the model factory, the caption collator and checkpoints.

``build_model(cfg) -> (model, processor)`` is a factory with plain branches, not a registry:

* ``name_or_path`` is a hub id (``Salesforce/blip2-opt-6.7b``), a local folder, ``tiny`` or ``tiny-t5``;
* ``random_init: true`` builds the full-size architecture from the config shipped in
  ``medcap/model_configs/<name>/config.json`` with cheap random weights (no hub, no slow init), and an
  offline byte-level BPE tokenizer shipped in ``medcap/model_configs/tokenizer/``;
* precision (fp32/fp16/bf16), bitsandbytes 8-bit / 4-bit NF4 loading, gradient checkpointing;
* PEFT (LoRA, QLoRA, DoRA, rsLoRA, (IA)3) with named target presets whose scope is explicit, or full
  training of the Q-Former / vision tower / projection, or a full fine-tune.

Another image-text-to-text family (LLaVA, Qwen-VL ...) is one more branch in ``_build_base`` and in
the ``FAMILY`` tables below: the collator, PEFT and checkpoint code only ask for ``family``.

``CaptionCollator`` turns (image, caption) pairs into training batches. The image tokens are inserted
by the PROCESSOR (tokenizing with ``processor.tokenizer`` alone silently drops the image in
transformers 5.x), labels are -100 at padding, image tokens and prompt, and an EOS ends each caption so
the model learns to stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from PIL import Image

from medcap.config import ConfigError, from_dict

log = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_DIR = MODEL_CONFIGS_DIR / "tokenizer"

#: Hub ids whose configs ship in ``model_configs/<short name>/config.json``.
SHIPPED_CONFIGS = {
    "Salesforce/blip2-opt-6.7b": "blip2-opt-6.7b",
    "Salesforce/blip2-opt-2.7b": "blip2-opt-2.7b",
    "Salesforce/blip2-flan-t5-xl": "blip2-flan-t5-xl",
}

#: Built-in tiny models for tests and the demo (no hub, built in milliseconds).
TINY_NAMES = ("tiny", "tiny-t5")

Family = Literal["auto", "blip2-opt", "blip2-t5"]
FAMILIES = ("blip2-opt", "blip2-t5")
#: Families whose language model is a decoder only (the prompt is part of the sequence and the
#: generated ids repeat it) versus encoder-decoder (the prompt goes to the encoder).
DECODER_ONLY = {"blip2-opt": True, "blip2-t5": False}

# ---------------------------------------------------------------------------------------------
# LoRA target presets. Each preset is a regex over full module names (peft matches it with
# re.fullmatch), so the scope is explicit: "language_model" alone never reaches the vision tower's
# fc1/fc2 or the Q-Former. Presets are per family because module names differ (OPT q_proj, T5 q).
# ---------------------------------------------------------------------------------------------
_LM = r"language_model\..*\."
_QF = r"qformer\..*\."
TARGET_PRESETS: dict[str, dict[str, str]] = {
    "blip2-opt": {
        "lm-qv": _LM + r"(q_proj|v_proj)",
        "lm-attn": _LM + r"(q_proj|k_proj|v_proj|out_proj)",
        "lm-all": _LM + r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
        "qformer-qv": _QF + r"attention\.(query|value)",
        "qformer-attn": _QF + r"attention\.(query|key|value)",
    },
    "blip2-t5": {
        "lm-qv": _LM + r"(q|v)",
        "lm-attn": _LM + r"(q|k|v|o)",
        "lm-all": _LM + r"(q|k|v|o|wi|wi_0|wi_1|wo)",
        "qformer-qv": _QF + r"attention\.(query|value)",
        "qformer-attn": _QF + r"attention\.(query|key|value)",
    },
}
#: Module name endings that (IA)3 treats as feed-forward (it scales their input, not output).
FEEDFORWARD_NAMES = {"blip2-opt": ("fc1", "fc2"), "blip2-t5": ("wi", "wi_0", "wi_1", "wo")}


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning: which method, its size, and where it lands."""

    #: none | lora | dora | rslora | ia3. QLoRA is ``lora`` with ``model.quantization: 4bit``.
    method: Literal["none", "lora", "dora", "rslora", "ia3"] = "lora"
    #: LoRA rank.
    r: int = 16
    #: LoRA alpha (scaling alpha / r, or alpha / sqrt(r) for rslora).
    alpha: float = 32.0
    #: Dropout on the LoRA input.
    dropout: float = 0.05
    #: A preset expression such as ``lm-qv`` (the language model's q,v: PEFT's default and the
    #: original project's), ``lm-attn`` (q,k,v,out), ``lm-all`` (all LM linears incl. fc1/fc2 of the
    #: LANGUAGE MODEL ONLY), ``qformer-qv``, ``qformer-attn`` (Q-Former query,key,value, self and
    #: cross attention), combined with ``+`` (``lm-all+qformer-attn``); or a list of module names
    #: passed to PEFT as they are (PEFT matches a name anywhere: ``fc1`` reaches the vision tower too).
    targets: str | list[str] = "lm-qv"

    def __post_init__(self) -> None:
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
            known = sorted(TARGET_PRESETS["blip2-opt"])
            bad = [n for n in names if n not in known]
            if bad:
                raise ConfigError(
                    f"peft.targets: unknown preset {', '.join(map(repr, bad))}; presets are "
                    f"{', '.join(known)} (join with '+'), or give a list of module names"
                )
        elif not self.targets:
            raise ConfigError("peft.targets: the list of module names is empty")


Precision = Literal["fp32", "fp16", "bf16"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelConfig:
    """Which model to build, in which precision, and which of its parameters train."""

    #: A hub id (``Salesforce/blip2-opt-6.7b``), a local folder holding config.json (+ weights),
    #: ``tiny`` (built-in tiny BLIP-2 with OPT) or ``tiny-t5`` (tiny BLIP-2 with a T5 encoder-decoder).
    name_or_path: str = "Salesforce/blip2-opt-6.7b"
    #: Model family; ``auto`` reads it from the config (``blip2-opt`` or ``blip2-t5``).
    family: Family = "auto"
    #: Build the architecture with random weights instead of loading them: no hub needed for the
    #: shipped Salesforce configs. For dry runs, benchmarks and memory checks.
    random_init: bool = False
    #: Seed of the random weights (random_init and tiny models), so a checkpoint can rebuild them.
    init_seed: int = 0
    #: Weight dtype. The Q-Former and query tokens stay fp32 (as transformers does) to avoid NaNs.
    precision: Precision = "fp32"
    #: bitsandbytes weight quantization of the linear layers: 8-bit (LLM.int8) or 4-bit NF4 with
    #: double quantization (QLoRA).
    quantization: Literal["none", "8bit", "4bit"] = "none"
    #: Compute dtype of 4-bit layers; ``auto`` takes ``precision`` (fp32 when precision is fp32).
    compute_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    #: Recompute activations in the backward pass (non-reentrant, works with LoRA) to save memory.
    gradient_checkpointing: bool = False
    #: Text the caption follows (LAVIS used "a photo of "); empty by default. It is masked out of the
    #: loss and given again at generation time.
    prompt: str = ""
    #: Input image size in pixels (overrides the config's; position embeddings are interpolated).
    image_size: int | None = None
    #: Parameter-efficient fine-tuning.
    peft: PeftSettings = field(default_factory=PeftSettings)
    #: Train the whole Q-Former and the query tokens (BLIP-2's own caption fine-tune does).
    train_qformer: bool = False
    #: Train the whole vision tower (BLIP-2's own caption fine-tune does; costs memory).
    train_vision: bool = False
    #: Train the linear projection from the Q-Former to the language model.
    train_language_projection: bool = False
    #: Train every parameter (for the tiny demo model; requires peft.method none).
    full_finetune: bool = False
    #: On a CPU, run the frozen linear layers of a bf16/fp16 model in fp32 (weights stay stored in
    #: bf16/fp16, upcast one layer at a time). ``auto``: only where the CPU has no native bf16/fp16
    #: matrix product (no AVX512-BF16/AMX), where PyTorch's bf16 backward product runs ~100x slower
    #: than fp32. No effect on a GPU.
    cpu_fp32_matmul: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        if "<image>" in self.prompt:
            raise ConfigError(
                "model.prompt must not contain '<image>': the processor inserts the image tokens"
            )
        if not self.name_or_path.strip():
            raise ConfigError("model.name_or_path: empty; give a hub id, a local folder or 'tiny'")
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


# ---------------------------------------------------------------------------------------------
# Family resolution and configs
# ---------------------------------------------------------------------------------------------


def _family_of_text_config(text_cfg: Any, where: str) -> str:
    model_type = text_cfg["model_type"] if isinstance(text_cfg, dict) else text_cfg.model_type
    if model_type == "opt":
        return "blip2-opt"
    if model_type == "t5":
        return "blip2-t5"
    raise ConfigError(
        f"{where}: language model type {model_type!r} is not supported; medcap builds BLIP-2 with "
        "OPT (blip2-opt) or T5 (blip2-t5)"
    )


def _config_json_path(name_or_path: str) -> Path | None:
    """The config.json that describes ``name_or_path`` without the hub (None for unknown hub ids)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local / "config.json"
    short = SHIPPED_CONFIGS.get(name_or_path) or (
        name_or_path if name_or_path in SHIPPED_CONFIGS.values() else None
    )
    if short:
        return MODEL_CONFIGS_DIR / short / "config.json"
    return None


def resolve_family(cfg: ModelConfig) -> str:
    """The concrete family (``blip2-opt`` or ``blip2-t5``) of ``cfg``, reading configs if needed."""
    if cfg.family != "auto":
        return cfg.family
    if cfg.name_or_path == "tiny":
        return "blip2-opt"
    if cfg.name_or_path == "tiny-t5":
        return "blip2-t5"
    path = _config_json_path(cfg.name_or_path)
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("model_type") not in ("blip-2", None):
            raise ConfigError(
                f"model.name_or_path {cfg.name_or_path}: {path} describes a {data.get('model_type')!r} "
                "model; medcap builds BLIP-2 (model_type blip-2)"
            )
        return _family_of_text_config(data.get("text_config", {"model_type": "opt"}), str(path))
    # An unknown hub id: its config is not here; the name says it in every Salesforce release.
    return "blip2-t5" if "t5" in cfg.name_or_path.lower() else "blip2-opt"


def _blip2_config_from_file(path: Path):
    from transformers import Blip2Config

    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a local model folder needs its config.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    return Blip2Config.from_dict(data)


def tiny_blip2_config(family: str, vocab_size: int, image_token_index: int, special: dict[str, int]):
    """The built-in tiny BLIP-2: builds in milliseconds, learns phantom facts on a CPU.

    Vision hidden 128 (FACTS 3: hidden 64 learned modality but not lesion side/kind), 64 px images
    in a 4 x 4 grid of 16 px patches with sine-cosine starting positions (``_sincos_vision_positions``),
    a 2-layer Q-Former with cross-attention in every layer, 8 query tokens and a 2-layer, 64-wide
    language model. Measured on 700 phantoms (tests/test_learns.py settings, 900 steps at batch 32):
    with 8 px patches and random positions, 300 steps learned modality and region but lesion side
    stayed at chance; 16 px patches make a step ~1.5x cheaper, and with sine-cosine positions the side
    is read off the image (0.77 where only the image tells it, against 0.5 for a guess).
    """
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

    vision = Blip2VisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
        initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        cross_attention_frequency=1,
        encoder_hidden_size=128,
        max_position_embeddings=64,
        vocab_size=64,
        # No dropout: the tiny model learns from scratch in a few hundred steps.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if family == "blip2-opt":
        text = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=256,
            max_position_embeddings=512,
            bos_token_id=special["bos"],
            eos_token_id=special["eos"],
            pad_token_id=special["pad"],
            dropout=0.0,
        )
    else:
        text = T5Config(
            vocab_size=vocab_size,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            eos_token_id=special["eos"],
            pad_token_id=special["pad"],
            decoder_start_token_id=special["pad"],
            dropout_rate=0.0,
        )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=8,
        image_token_index=image_token_index,
        # The std of every random weight (_random_fill). 0.02 (BERT's, for 768+ wide layers) leaves
        # 64-128 wide layers so small that the image barely moves the Q-Former output at first and
        # the language model learns the caption prior instead; measured on 600 phantoms (600 steps,
        # batch 16), 0.05 got held-out modality 0.70 and region 0.67 against 0.54 and 0.43 for 0.02
        # (0.1: 0.58, 0.52).
        initializer_range=0.05,
    )


# ---------------------------------------------------------------------------------------------
# The offline tokenizer and processor
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}


def train_caption_tokenizer(lines: list[str], vocab_size: int = 2048):
    """Train a byte-level BPE (``tokenizers``) on ``lines``: any text encodes, none is unknown.

    Special tokens come first, in a fixed order: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3,
    ``<image>`` 4. Used to write the shipped ``model_configs/tokenizer/tokenizer.json``
    (``python -m medcap.model write-tokenizer``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def write_shipped_tokenizer(vocab_size: int = 2048) -> Path:
    """Regenerate ``model_configs/tokenizer/tokenizer.json`` from ``corpus.txt`` next to it."""
    lines = (TOKENIZER_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tok = train_caption_tokenizer(lines, vocab_size)
    out = TOKENIZER_DIR / "tokenizer.json"
    tok.save(str(out), pretty=False)
    return out


def offline_tokenizer(family: str):
    """The shipped byte-level BPE tokenizer as a transformers fast tokenizer.

    OPT style (``blip2-opt``): ``<s>`` before the text, as OPT's tokenizer does. T5 style
    (``blip2-t5``): ``</s>`` after the text, as T5's does.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    path = TOKENIZER_DIR / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (it ships with medcap); regenerate it with `python -m medcap.model write-tokenizer`"
        )
    tok = Tokenizer.from_file(str(path))
    ids = {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}
    if family == "blip2-t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["eos"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["bos"])]
        )
    # "<image>" is already a special token of the vocabulary (id 4); Blip2Processor registers it as its
    # image token (as an AddedToken, which it needs) without creating a new id.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=512,
    )
    return fast


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
        "image": tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
    }


def make_processor(tokenizer, image_size: int, num_query_tokens: int):
    """A ``Blip2Processor`` from a tokenizer: CLIP mean/std, bicubic resize to ``image_size``.

    The Pillow image processor is used because the torchvision one would need torchvision.
    """
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def _round_up(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)


# ---------------------------------------------------------------------------------------------
# Fast random initialisation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _random_fill(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter cheaply and reproducibly: random weights, zero biases, unit norms.

    The default initialisation of BLIP2-OPT-6.7B took 96 s here, and even drawing 7.75B fresh normal
    numbers takes minutes on a small CPU. Random weights for dry runs, memory checks and benchmarks
    only need the right shapes and sane scales, so the weights are cut from a pool of
    ``_POOL_SIZE`` normal(0, std) numbers at random offsets: a memory copy, seconds for 7.75B. The
    tiny models (well under the pool size per tensor) get fully independent values. One generator
    seeded with ``seed`` makes the result reproducible.
    """
    # All threads: the time goes to the kernel handing out fresh zeroed pages (page faults: 16 GB
    # for the 6.7B model), and two threads fault in parallel. Measured on the 2-core box, idle: 6.7B
    # build 27.4 s with one fill thread, 18.8 s with two (the default init: 96 s).
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pools: dict[torch.dtype, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights (OPT's lm_head is its embedding)
            continue
        seen.add(id(param))
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, torch.nn.LayerNorm) or type(owner).__name__.endswith("LayerNorm"):
            param.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            param.zero_()
        elif param.numel() <= _POOL_SIZE // 4:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        else:
            if param.dtype not in pools:
                pool = torch.randn(_POOL_SIZE, generator=gen).mul_(std).to(param.dtype)
                pools[param.dtype] = torch.cat([pool, pool])  # any window up to _POOL_SIZE is contiguous
            pool = pools[param.dtype]
            flat = param.view(-1)
            for begin in range(0, flat.numel(), _POOL_SIZE):
                piece = flat[begin : begin + _POOL_SIZE]
                offset = int(torch.randint(0, _POOL_SIZE, (1,), generator=gen))
                piece.copy_(pool[offset : offset + piece.numel()])


#: Random numbers drawn once per dtype by ``_random_fill`` (4M: 0.2 s to draw).
_POOL_SIZE = 1 << 22


def _materialize_random(config, dtype: torch.dtype, seed: int):
    """Build ``Blip2ForConditionalGeneration(config)`` without the default initialisation.

    Parameters are created on the meta device (no memory, no init work), then allocated once in
    ``dtype`` and filled by ``_random_fill``. Buffers (position ids) are built normally.
    """
    from accelerate import init_empty_weights
    from transformers import Blip2ForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = Blip2ForConditionalGeneration(config)
    keep_fp32 = ("qformer.", "query_tokens")
    for module_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            want = torch.float32 if full.startswith(keep_fp32) else dtype
            new = torch.nn.Parameter(torch.empty(param.shape, dtype=want), requires_grad=param.requires_grad)
            module._parameters[pname] = new
    # Tying was done on meta tensors; redo it on the real ones.
    model.tie_weights()
    _random_fill(model, seed, std=getattr(config, "initializer_range", 0.02))
    model.config.dtype = dtype
    return model


# ---------------------------------------------------------------------------------------------
# build_model
# ---------------------------------------------------------------------------------------------


def _compute_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.compute_dtype != "auto":
        return DTYPES[cfg.compute_dtype]
    return DTYPES[cfg.precision]


#: Modules bitsandbytes leaves unquantized: the fp32 Q-Former (as transformers keeps it), the small
#: projection, and the output head (tied to the input embedding in OPT; int8 heads lose accuracy).
QUANT_SKIP_MODULES = ["qformer", "query_tokens", "language_projection", "lm_head"]


def _quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_compute_dtype(cfg),
        llm_int8_skip_modules=QUANT_SKIP_MODULES,
    )


def _device_map() -> dict[str, Any]:
    """Quantized loading needs a device map: this process's GPU, or the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def _offline_config(cfg: ModelConfig, family: str, tokenizer):
    """The ``Blip2Config`` of a tiny or shipped/local architecture, wired to the offline tokenizer."""
    special = _special_ids(tokenizer)
    name = cfg.name_or_path
    if name in TINY_NAMES:
        return tiny_blip2_config(family, _round_up(len(tokenizer)), special["image"], special)
    path = _config_json_path(name)
    if path is None:
        raise ConfigError(
            f"model.name_or_path {name!r}: its config is not here (no hub); shipped configs are "
            f"{', '.join(SHIPPED_CONFIGS)}, or give a local folder with config.json"
        )
    config = _blip2_config_from_file(path)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConfigError(f"{path}: vocab_size {config.text_config.vocab_size} is smaller than the tokenizer")
    # The offline tokenizer is smaller than the real one: point the special ids at it. The embedding
    # keeps the real vocabulary size, so parameter counts and memory are the real ones.
    config.image_token_index = special["image"]
    text = config.text_config
    text.pad_token_id = special["pad"]
    text.eos_token_id = special["eos"]
    if family == "blip2-opt":
        text.bos_token_id = special["bos"]
    else:
        text.decoder_start_token_id = special["pad"]
    return config


def _build_base(cfg: ModelConfig, family: str, meta: bool = False):
    """The model and processor before PEFT / trainable flags: one branch per way of getting them."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    dtype = DTYPES[cfg.precision]
    name = cfg.name_or_path
    if name in TINY_NAMES or cfg.random_init or meta:
        tokenizer = offline_tokenizer(family)
        config = _offline_config(cfg, family, tokenizer)
        if cfg.image_size:
            config.vision_config.image_size = cfg.image_size
        if meta:
            # Shapes only (parameter counts, planning): no memory, no initialisation work.
            with torch.device("meta"):
                model = Blip2ForConditionalGeneration(config)
            _cast_keeping_fp32(model, dtype)
        else:

            def random_model():
                model = _materialize_random(config, dtype, cfg.init_seed)
                if name in TINY_NAMES:
                    _sincos_vision_positions(model)
                return model

            # Quantized: built and dropped inside, so that no caller's name keeps the 16-bit model.
            model = _quantize_in_memory(random_model, cfg) if cfg.quantization != "none" else random_model()
        processor = make_processor(tokenizer, config.vision_config.image_size, config.num_query_tokens)
        return model, processor

    # Pretrained weights: a hub id (the real code path; nothing downloads in tests) or a folder.
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(cfg)
        kwargs["device_map"] = _device_map()
    if family in ("blip2-opt", "blip2-t5"):
        model = Blip2ForConditionalGeneration.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name)
        if getattr(processor, "num_query_tokens", None) is None:
            processor.num_query_tokens = model.config.num_query_tokens
    else:  # pragma: no cover - a new family is one more branch here
        raise ConfigError(f"model.family {family!r} is not supported")
    if cfg.image_size and cfg.image_size != model.config.vision_config.image_size:
        resize_vision_positions(model, cfg.image_size)
        processor.image_processor.size = {"height": cfg.image_size, "width": cfg.image_size}
    return model, processor


@torch.no_grad()
def _sincos_vision_positions(model) -> None:
    """Start the tiny vision tower's position embeddings as fixed 2-D sine-cosine codes (as MAE does).

    The tiny models learn from scratch in a few hundred steps. With random position embeddings the
    patches barely know where they are, so the model learns what is in an image (modality, region,
    finding) but not where (the lesion's side: chance after 300 steps). Half the channels encode the
    patch column and half the row, at geometric frequencies; the class position gets zeros. Still
    trainable parameters: only their starting point changes.
    """
    emb = _unwrap(model).vision_model.embeddings
    pos = emb.position_embedding
    dim = pos.shape[-1]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid != pos.shape[1] - 1 or dim % 4:
        return  # not a square patch grid with a class token: leave the random start
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    table = torch.cat([torch.zeros(1, dim), torch.cat(parts, dim=1)], dim=0)
    pos.copy_(table[None].to(pos.dtype))


def _cast_keeping_fp32(model, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` except the Q-Former and query tokens, which stay fp32 (as transformers does)."""
    for name, param in model.named_parameters():
        want = torch.float32 if name.startswith(("qformer.", "query_tokens")) else dtype
        if param.dtype != want:
            param.data = param.data.to(want)


@torch.no_grad()
def resize_vision_positions(model, image_size: int) -> None:
    """Re-grid the vision tower's position embeddings for ``image_size`` (bicubic, as LAVIS does).

    Pretrained BLIP-2 sees 224 px; LAVIS fine-tunes captioning at 364 px with interpolated positions.
    Resizing once at build time keeps every forward and generate call free of extra arguments.
    """
    emb = _unwrap(model).vision_model.embeddings
    patch = emb.patch_size
    if image_size % patch:
        raise ConfigError(f"model.image_size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    dummy = torch.empty(1, 1 + grid * grid, emb.embed_dim, device="meta")
    new = emb.interpolate_pos_encoding(dummy, image_size, image_size)
    emb.position_embedding = torch.nn.Parameter(
        new.contiguous(), requires_grad=emb.position_embedding.requires_grad
    )
    emb.image_size = image_size
    emb.num_patches = grid * grid
    emb.num_positions = grid * grid + 1
    _unwrap(model).config.vision_config.image_size = image_size


def _quantize_in_memory(make_model: Callable[[], Any], cfg: ModelConfig):
    """Quantize a random-init model's linears with bitsandbytes by a save/load round trip.

    bitsandbytes quantizes while loading, so the random model goes through ``from_pretrained`` from a
    temporary folder: the same code path as the hub weights. The 16-bit model is made here and freed
    before the load (its only reference dropped, its reference cycles collected): the 6.7B QLoRA dry
    run peaked at 24.0 GB of RAM, the whole 24 GB machine, while both were alive.
    """
    import gc
    import tempfile

    from transformers import Blip2ForConditionalGeneration

    log.info(
        "quantizing the random model %s through a temporary save (%s)", cfg.name_or_path, cfg.quantization
    )
    with tempfile.TemporaryDirectory(prefix="medcap-quant-") as tmp:
        model = make_model()
        model.save_pretrained(tmp)
        dtype = DTYPES[cfg.precision]
        del model
        gc.collect()
        quantized = Blip2ForConditionalGeneration.from_pretrained(
            tmp,
            dtype=dtype,
            quantization_config=_quantization_config(cfg),
            device_map=_device_map(),
        )
    return quantized


def resolve_targets(model: torch.nn.Module, settings: PeftSettings, family: str) -> tuple[Any, list[str]]:
    """The ``target_modules`` for PEFT (a regex or a list) and the module names it matches.

    Raises ``ConfigError`` when nothing matches, so a typo never trains nothing.
    """
    if isinstance(settings.targets, str):
        presets = TARGET_PRESETS[family]
        parts = [presets[n.strip()] for n in settings.targets.split("+")]
        pattern = "|".join(f"(?:{p})" for p in parts)
        regex = re.compile(pattern)
        matched = [
            n for n, m in model.named_modules() if regex.fullmatch(n) and isinstance(m, _linear_types())
        ]
        target: Any = pattern
    else:
        names = list(settings.targets)
        matched = [
            n
            for n, m in model.named_modules()
            if isinstance(m, _linear_types()) and any(n == t or n.endswith("." + t) for t in names)
        ]
        target = names
    if not matched:
        raise ConfigError(f"model.peft.targets {settings.targets!r} matches no linear layer of this model")
    return target, matched


def _linear_types() -> tuple[type, ...]:
    """Linear layer classes PEFT can adapt: torch's and bitsandbytes' (imported lazily)."""
    types_: list[type] = [torch.nn.Linear]
    with contextlib.suppress(Exception):
        import bitsandbytes as bnb

        types_ += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    return tuple(types_)


def _apply_peft(model, cfg: ModelConfig, family: str):
    from peft import IA3Config, LoraConfig, get_peft_model

    settings = cfg.peft
    target, matched = resolve_targets(model, settings, family)
    if settings.method == "ia3":
        ff_names = FEEDFORWARD_NAMES[family]
        if isinstance(target, str):
            ff = [n for n in matched if n.rsplit(".", 1)[-1] in ff_names]
            target = matched  # explicit names so feedforward_modules can be a subset of them
        else:
            ff = [t for t in target if t.rsplit(".", 1)[-1] in ff_names]
        peft_cfg = IA3Config(target_modules=target, feedforward_modules=ff)
    else:
        peft_cfg = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=target,
            use_dora=settings.method == "dora",
            use_rslora=settings.method == "rslora",
            bias="none",
        )
    return get_peft_model(model, peft_cfg), matched


def _set_trainable(model, cfg: ModelConfig) -> None:
    inner = _unwrap(model)
    if cfg.full_finetune:
        for p in inner.parameters():
            p.requires_grad_(True)
        return
    if cfg.train_qformer:
        for p in inner.qformer.parameters():
            p.requires_grad_(True)
        inner.query_tokens.requires_grad_(True)
    if cfg.train_vision:
        for p in inner.vision_model.parameters():
            p.requires_grad_(True)
    if cfg.train_language_projection:
        for p in inner.language_projection.parameters():
            p.requires_grad_(True)


def _unwrap(model):
    """The Blip2ForConditionalGeneration inside a PeftModel (or the model itself)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def import_backends() -> None:
    """Import transformers and peft (and through it bitsandbytes), in a frame that holds no model.

    Their first import raises and catches optional imports, and bitsandbytes logs one of them with
    the exception as an argument. That exception's traceback keeps alive every frame that was on
    the stack, with the locals each frame has when it returns, for as long as anything keeps the
    exception: a log handler that stores records (pytest's does) or a reference cycle waiting for
    the collector. Measured: a function that imported peft and then built a model kept that model
    alive after ``del`` (benchmarks/gpu_bench.py's stale_before_build_gib). So the callers that
    build models import here first, in a thin frame.
    """
    import peft  # noqa: F401
    import transformers  # noqa: F401


def build_model(cfg: ModelConfig, verbose: bool = True, meta: bool = False):
    """Build the BLIP-2 model and its processor as ``cfg`` says, with PEFT and trainable flags applied.

    Returns ``(model, processor)``. The model is a ``PeftModel`` when ``cfg.peft.method`` is not
    ``none``. The model is in eval mode (call ``model.train()`` to train). ``model.medcap_config`` holds ``cfg`` and ``model.medcap_lora_modules`` the names of the
    modules that got adapters. Prints the trainable and total parameter counts (``verbose``).

    ``meta=True`` builds on the meta device from the tiny, shipped or local config: shapes only, no
    memory and no weights, for parameter counts and memory planning (quantization is not applied).
    """
    import_backends()  # before the clock starts (the build time excludes imports), see there for why here
    return _build_model(cfg, verbose, meta)


def _build_model(cfg: ModelConfig, verbose: bool, meta: bool):
    start = time.perf_counter()
    family = resolve_family(cfg)
    if meta and cfg.quantization != "none":
        cfg = dataclasses.replace(cfg, quantization="none")
    model, processor = _build_base(cfg, family, meta=meta)

    _align_stop_tokens(model, processor)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Casts the non-quantized parameters (norms, Q-Former, projection) to fp32 for stable
        # training, and enables gradient checkpointing (non-reentrant) if asked.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        # Non-reentrant: adapters inside checkpointed blocks get gradients even though the frozen
        # embeddings' outputs do not require grad (the reentrant variant would silently give none).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    matched: list[str] = []
    if cfg.peft.method != "none":
        # On meta, create the adapters on meta too (no initialisation work for shapes-only builds).
        with torch.device("meta") if meta else contextlib.nullcontext():
            model, matched = _apply_peft(model, cfg, family)
    _set_trainable(model, cfg)

    _no_cache_in_training(model)
    if not meta and cfg.quantization == "none" and cfg.precision in ("bf16", "fp16"):
        if cfg.cpu_fp32_matmul == "on" or (
            cfg.cpu_fp32_matmul == "auto" and not cpu_has_native_half_matmul(cfg.precision)
        ):
            upcast_frozen_linears_on_cpu(model)
    # Eval mode, as from_pretrained returns it: the training loop calls model.train() itself.
    model.eval()
    model.medcap_config = cfg
    model.medcap_family = family
    model.medcap_lora_modules = matched
    trainable, total = count_parameters(model)
    if verbose:
        seconds = time.perf_counter() - start
        print(
            f"model {cfg.name_or_path} ({family}, {cfg.precision}, quantization {cfg.quantization}): "
            f"{total / 1e6:,.2f}M parameters, {trainable / 1e6:,.3f}M trainable "
            f"({100 * trainable / max(total, 1):.3f}%), built in {seconds:.1f} s"
        )
        if cfg.peft.method != "none":
            print(f"peft {cfg.peft.method} r={cfg.peft.r} on {len(matched)} modules: {_summarize(matched)}")
    return model, processor


# ---------------------------------------------------------------------------------------------
# Frozen bf16/fp16 linear layers on a CPU without native half-precision matrix products
# ---------------------------------------------------------------------------------------------


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


def image_side(processor) -> int | None:
    """The model's input side in pixels (what the image processor resizes to), or None if unknown.

    Loaders pass it to ``data.load_image(min_size=...)`` so JPEGs decode in draft mode at no less
    than this size; training, the query cache and predict all use it, so they see the same pixels.
    """
    size = getattr(getattr(processor, "image_processor", processor), "size", None)
    if isinstance(size, int):
        return size
    if size is None or not hasattr(size, "get"):
        return None
    # A plain dict (older processors, saved configs) or transformers 5's SizeDict dataclass, which
    # has .get but is no dict: missing that made every caller decode JPEGs at full size.
    values = [size.get(k) for k in ("height", "width", "shortest_edge")]
    values = [int(v) for v in values if v]
    return min(values) if values else None


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


def _no_train_cache(module, args, kwargs):
    """Forward pre-hook: no KV cache while training (see ``_no_cache_in_training``)."""
    if module.training and torch.is_grad_enabled() and kwargs.get("use_cache") is None:
        kwargs["use_cache"] = False
    return args, kwargs


def _no_cache_in_training(model) -> None:
    """Make training forwards of the language model build no KV cache.

    The BLIP-2 language models default to ``use_cache=True``: without gradient checkpointing a
    training forward builds a ``DynamicCache`` holding every layer's keys and values and returns it
    with the logits (b x s x 2 x layers x hidden, 1.6 GiB for 6.7B at batch 32 and 100 tokens), memory
    that nothing reads. Generation (``generate`` runs under ``no_grad``), eval forwards and an explicit
    ``use_cache=`` argument are left alone.
    """
    inner = _unwrap(model)
    lm = getattr(inner, "language_model", None)
    if lm is not None and not getattr(lm, "_medcap_no_train_cache", False):
        lm.register_forward_pre_hook(_no_train_cache, with_kwargs=True)
        lm._medcap_no_train_cache = True


def _align_stop_tokens(model, processor) -> None:
    """Make ``generate()`` stop at the tokenizer's EOS (what CaptionCollator appends) and the model's.

    The Salesforce OPT models stop at "\n" (50118, LAVIS's caption end) while their tokenizer's EOS is
    ``</s>``; a fine-tuned model learns ``</s>``. BLIP-2's ``generate`` runs the language model's own
    ``generate``, so both generation configs get the list.
    """
    stops: list[int] = []
    for value in (processor.tokenizer.eos_token_id, getattr(model.config.text_config, "eos_token_id", None)):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in stops:
                stops.append(i)
    for owner in (model, getattr(model, "language_model", None)):
        gen = getattr(owner, "generation_config", None)
        if gen is None:
            continue
        current = gen.eos_token_id
        ids = list(current) if isinstance(current, list) else ([] if current is None else [current])
        ids += [i for i in stops if i not in ids]
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
        if gen.pad_token_id is None:
            gen.pad_token_id = processor.tokenizer.pad_token_id


def _summarize(names: list[str]) -> str:
    """Module names with layer numbers folded: ``language_model.model.decoder.layers.*.self_attn.q_proj``."""
    folded = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    return ", ".join(folded)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class CaptionCollator:
    """Turn a list of ``(PIL image, caption)`` into a training batch.

    Returns ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` (and, for encoder-decoder
    families, ``decoder_attention_mask``):

    * decoder-only (OPT): the processor builds ``<image>*N <s> prompt`` (the image tokens come from the
      PROCESSOR, never from the bare tokenizer), the caption tokens and an EOS follow, right padding;
      labels are the same length as ``input_ids``, -100 at padding, image tokens and prompt;
    * encoder-decoder (T5): ``<image>*N prompt </s>`` goes to the encoder, the caption + EOS are the
      labels, -100 at padding.

    ``max_length`` caps the whole decoder-only sequence (image tokens included, as the processor counts)
    or the T5 labels. A caption cut by it loses its EOS (it did not end there); ``truncated`` counts them.
    ``pad_to_multiple_of`` rounds the padded width up (8 on GPUs: fewer distinct shapes for the kernels
    and their per-shape set-up, tensor-core aligned); the extra pads are masked and change no loss.
    """

    def __init__(self, processor, model_cfg: ModelConfig, max_length: int = 128, pad_to_multiple_of: int = 1):
        if pad_to_multiple_of < 1:
            raise ValueError(f"CaptionCollator: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.processor = processor
        self.cfg = model_cfg
        self.family = resolve_family(model_cfg)
        self.decoder_only = DECODER_ONLY[self.family]
        self.max_length = max_length
        self.tokenizer = processor.tokenizer
        self.num_query_tokens = processor.num_query_tokens
        image_token = getattr(processor.image_token, "content", processor.image_token)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set processor.tokenizer.pad_token")
        self.eos_id = self.tokenizer.eos_token_id
        self.truncated = 0
        # The prompt tokens are fixed: measure them once.
        self.prompt_ids = self._prompt_encoding([Image.new("RGB", (8, 8))])["input_ids"][0].tolist()
        if self.decoder_only and len(self.prompt_ids) + 2 > max_length:
            raise ValueError(
                f"max_length {max_length} leaves no room for a caption after {len(self.prompt_ids)} "
                "image and prompt tokens; raise max_length"
            )

    def _padded_width(self, width: int) -> int:
        m = self.pad_to_multiple_of
        return -(-width // m) * m

    def _prompt_encoding(self, images: list[Image.Image]):
        return self.processor(images=images, text=[self.cfg.prompt] * len(images), return_tensors="pt")

    def _caption_ids(self, caption: str) -> list[int]:
        if not isinstance(caption, str):
            raise TypeError(f"CaptionCollator: a caption must be a string, got {type(caption).__name__}")
        # split_special_tokens: a caption that happens to contain "<image>" or "</s>" is text, not
        # an image slot (which would break the image scatter) or an early end.
        return self.tokenizer(caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def __call__(self, batch: list[tuple[Image.Image, str]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("CaptionCollator got an empty batch")
        images = [img for img, _ in batch]
        captions = [cap for _, cap in batch]
        enc = self._prompt_encoding(images)
        pad = self.tokenizer.pad_token_id
        if self.decoder_only:
            prompt = enc["input_ids"]
            if prompt.shape[1] != len(self.prompt_ids):
                raise RuntimeError("the processor produced prompts of different lengths for one prompt text")
            room = self.max_length - prompt.shape[1]
            rows, label_rows = [], []
            for i, cap in enumerate(captions):
                ids = self._caption_ids(cap)
                if len(ids) + 1 > room:
                    ids = ids[:room]
                    self.truncated += 1
                else:
                    ids = ids + [self.eos_id]
                rows.append(prompt[i].tolist() + ids)
                # Image tokens and prompt are inputs, not targets: mask them.
                label_rows.append([-100] * prompt.shape[1] + ids)
            width = self._padded_width(max(len(r) for r in rows))
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
                input_ids[i, : len(r)] = torch.tensor(r)
                labels[i, : len(lab)] = torch.tensor(lab)
                attention[i, : len(r)] = 1
            return {
                "pixel_values": enc["pixel_values"],
                "input_ids": input_ids,
                "attention_mask": attention,
                "labels": labels,
            }
        # Encoder-decoder: the labels are the caption and its EOS; T5 shifts them right itself to
        # make the decoder inputs (-100 becomes the pad / decoder start token).
        label_rows = []
        for cap in captions:
            ids = self._caption_ids(cap)
            if len(ids) + 1 > self.max_length:
                ids = ids[: self.max_length]
                self.truncated += 1
            else:
                ids = ids + [self.eos_id]
            label_rows.append(ids)
        width = self._padded_width(max(len(r) for r in label_rows))
        labels = torch.full((len(label_rows), width), -100, dtype=torch.long)
        dec_mask = torch.zeros((len(label_rows), width), dtype=torch.long)
        for i, r in enumerate(label_rows):
            labels[i, : len(r)] = torch.tensor(r)
            dec_mask[i, : len(r)] = 1
        return {
            "pixel_values": enc["pixel_values"],
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "decoder_attention_mask": dec_mask,
        }


def generation_inputs(
    processor, images: list[Image.Image], prompt: str, family: str
) -> dict[str, torch.Tensor]:
    """Inputs for ``model.generate``: images and the prompt only (``<image>*N <s> prompt`` for OPT).

    Left padding for decoder-only models (batched generation continues from the right end).
    ``input_ids.shape[1]`` is the ``prompt_len`` that ``decode_captions`` slices off.
    """
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left" if DECODER_ONLY[family] else "right"
    try:
        enc = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    return dict(enc)


def decode_captions(processor, output_ids: torch.Tensor, prompt_len: int, family: str) -> list[str]:
    """Captions from ``generate()`` output: drop the repeated prompt (decoder-only) and special tokens."""
    if DECODER_ONLY[family]:
        output_ids = output_ids[:, prompt_len:]
    texts = processor.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
    return [t.strip() for t in texts]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

#: Random-init models up to this many parameters store their base weights in a checkpoint
#: (base.safetensors); larger ones are rebuilt from ``init_seed`` and checked by a fingerprint.
BASE_WEIGHTS_LIMIT = 50_000_000


def _adapter_param_names(model) -> set[str]:
    """Names of the PEFT adapter's own parameters (what ``adapter/`` holds), by the tuner's prefix."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return set()
    prefix = model.base_model.prefix  # "lora_" (LoRA, DoRA's lora_magnitude_vector) or "ia3_"
    return {n for n, _ in model.named_parameters() if prefix in n}


def _fingerprint(model) -> str:
    """A cheap hash of a few base tensors, to check a rebuilt random-init base is the same."""
    h = hashlib.sha256()
    inner = _unwrap(model)
    for name in ("query_tokens",):
        h.update(getattr(inner, name).detach().float().cpu().numpy().tobytes())
    emb = inner.get_input_embeddings().weight
    h.update(emb[:8].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_trainable(model, directory: str | Path) -> list[str]:
    """Write what ``load_checkpoint`` needs besides ``config.yaml`` (the caller writes that).

    * ``adapter/``: the PEFT adapter (``save_pretrained``), loadable by PEFT itself for export;
    * ``trainable.safetensors``: every other parameter with ``requires_grad`` (fully trained
      Q-Former, vision tower, projection; everything for a full fine-tune), by module name;
    * for random-init and tiny models (whose base weights are not on any hub): ``base.safetensors``
      with the base weights when small, else ``base_fingerprint.txt`` (rebuilt from ``init_seed``).

    Files are written to temporary names and renamed, so a crash never leaves half a file.
    Returns the names written.
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig | None = getattr(model, "medcap_config", None)
    written: list[str] = []
    adapter_names = _adapter_param_names(model)
    if isinstance(model, PeftModel):
        tmp = directory / "adapter.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp))
        final = directory / "adapter"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        written.append("adapter")
    rest = {
        _plain_name(n): p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and n not in adapter_names
    }
    if rest:
        _atomic_save(save_file, rest, directory / "trainable.safetensors")
        written.append("trainable.safetensors")
    if cfg is not None and (cfg.random_init or cfg.name_or_path in TINY_NAMES):
        inner = _unwrap(model)
        _, total = count_parameters(inner)
        if total <= BASE_WEIGHTS_LIMIT and cfg.quantization == "none":
            # Frozen base weights only: trained ones are in trainable.safetensors already.
            base = {
                _plain_name(n): p.detach().cpu().contiguous()
                for n, p in model.named_parameters()
                if n not in adapter_names and not p.requires_grad
            }
            if base:
                _atomic_save(save_file, base, directory / "base.safetensors")
                written.append("base.safetensors")
        else:
            (directory / "base_fingerprint.txt").write_text(_fingerprint(model) + "\n", encoding="utf-8")
            written.append("base_fingerprint.txt")
    # A folder saved into again (checkpoints/last) must not keep files of another configuration.
    for stale in CHECKPOINT_MODEL_FILES - set(written):
        path = directory / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return written


#: The files ``save_trainable`` may write into a checkpoint folder.
CHECKPOINT_MODEL_FILES = {"adapter", "trainable.safetensors", "base.safetensors", "base_fingerprint.txt"}


def _plain_name(name: str) -> str:
    """Parameter names without PEFT's wrapper prefix and base_layer hops, so they match either way."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _atomic_save(save_file, tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _copy_into(model, path: Path) -> None:
    """Copy the tensors of a safetensors file into the parameters of the same (plain) names."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = {_plain_name(n): p for n, p in model.named_parameters()}
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(
            f"{path}: parameters this model does not have: {missing[:5]}; was the checkpoint written "
            "for another model config?"
        )
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}"
                )
            params[k].copy_(v.to(params[k].dtype))


def load_trainable(model, directory: str | Path) -> None:
    """Load a checkpoint's model files into a model built from the same config (resume, inference).

    Order: random-init base weights (``base.safetensors``, or a ``base_fingerprint.txt`` check), the
    PEFT adapter (``adapter/``), then the other trained parameters (``trainable.safetensors``).
    """
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / "base.safetensors").is_file():
        _copy_into(model, directory / "base.safetensors")
    fingerprint = directory / "base_fingerprint.txt"
    if fingerprint.is_file():
        want = fingerprint.read_text(encoding="utf-8").strip()
        got = _fingerprint(model)
        if want != got:
            raise ValueError(
                f"{fingerprint}: the rebuilt random base differs from the trained one ({got} != {want}); "
                "the init code, init_seed or torch version changed, so this adapter was trained on other weights"
            )
    adapter = directory / "adapter"
    if adapter.is_dir():
        if not isinstance(model, PeftModel):
            raise ValueError(
                f"{adapter} holds a PEFT adapter but the model config builds none (peft.method none)"
            )
        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors")
        result = set_peft_model_state_dict(model, load_file(str(weights)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{adapter}: weights that fit no module of this model: {unexpected[:5]}")
    elif isinstance(model, PeftModel):
        raise FileNotFoundError(
            f"{directory}: the config builds a PEFT adapter but there is no adapter/ folder"
        )
    if (directory / "trainable.safetensors").is_file():
        _copy_into(model, directory / "trainable.safetensors")


def load_checkpoint(directory: str | Path, verbose: bool = False):
    """Rebuild a trained model from a checkpoint folder: ``(model, processor, run_cfg_dict)``.

    Reads ``config.yaml`` (the run config; its ``model`` section is a ``ModelConfig``), builds the base
    model from it, then ``load_trainable``. The model is in eval mode.
    """
    directory = Path(directory)
    cfg_path = directory / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} is not a medcap checkpoint: no config.yaml")
    try:
        run_cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_path}: not valid YAML: {e}") from None
    if not isinstance(run_cfg, dict) or "model" not in run_cfg:
        raise ConfigError(f"{cfg_path}: no 'model' section")
    try:
        model_cfg = from_dict(ModelConfig, run_cfg["model"])
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: model: {e}") from None
    model, processor = build_model(model_cfg, verbose=verbose)
    load_trainable(model, directory)
    model.eval()
    return model, processor, run_cfg


def main(argv: list[str] | None = None) -> int:
    """``python -m medcap.model write-tokenizer``: regenerate the shipped tokenizer."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["write-tokenizer"]:
        print(write_shipped_tokenizer())
        return 0
    print("usage: python -m medcap.model write-tokenizer")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
