"""``build_model(cfg) -> (model, processor)``: the factory every stage builds its model with.

It asks the model family (``medcap.model.families``) for the architecture, the transformers class
and the processor, and does the rest the same way for every family:

* weights: a hub id or local folder (``from_pretrained``, optionally 8-bit / 4-bit NF4 through
  bitsandbytes), a built-in tiny model, or ``random_init`` (the full-size architecture from its
  config.json with cheap random weights: no hub, no slow init); ``meta=True``: shapes only;
* precision (fp32/fp16/bf16, the family's fp32 parts kept fp32), gradient checkpointing;
* PEFT (LoRA, QLoRA, DoRA, rsLoRA and their inits, AdaLoRA, VeRA, (IA)3, OFT, BOFT, trainable
  norms: ``medcap.model.peft_methods``) on the family's named target presets, or whole family parts (``train_qformer``, ``train_vision``, ``train_language_projection``), or everything;
* on a CPU without native half-precision products, frozen half layers compute in fp32.

The model comes back in eval mode with ``medcap_config``, ``medcap_family`` (the family object)
and ``medcap_lora_modules`` set, and prints its trainable and total parameter counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from medcap.config.model import ModelConfig
from medcap.model.adapters import apply_peft, count_parameters, scope_counts, set_trainable, summarize, unwrap
from medcap.model.cpu import cpu_has_native_half_matmul, upcast_frozen_linears_on_cpu
from medcap.model.families import resolve_family
from medcap.model.family import ModelFamily
from medcap.model.hub import check_hub_model
from medcap.model.peft_methods import AdapterSetup, check_loftq_device, describe
from medcap.model.quantize import DTYPES, cpu_safe_4bit_layers, pretrained_kwargs, quantize_in_memory
from medcap.model.random_init import materialize_random, meta_model


def import_backends() -> None:
    """Import transformers and peft (and through it bitsandbytes) in a thread of their own.

    Their first import raises and catches optional imports, and bitsandbytes logs one of them with
    the exception as an argument. That exception's traceback keeps alive every frame that was on
    the stack, with the locals each frame has when it returns, for as long as anything keeps the
    exception: a log handler that stores records (pytest's does) or a reference cycle waiting for
    the collector. Measured: a function that imported peft and then built a model kept that model
    alive after ``del`` (benchmarks/gpu_bench.py's stale_before_build_gib), and so did every caller
    above it (``load_captioner``, the service's loader). A thread's stack holds only its own frames,
    so the traceback can keep none of the caller's.
    """
    if "peft" in sys.modules and "transformers" in sys.modules:
        return
    # bitsandbytes' CPU backend warns on every import that an optional hub kernel package
    # ("kernels") is missing: noise to a medcap user (the built-in CPU path is used). Dropped by a
    # filter on that one message, before the record (and its exception) exists.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_ThirdPartyNoise())
    # DeepSpeed, when installed, warns at its first use on a machine without a GPU that it "was
    # unable to detect" one; medcap's own lines name the device a run uses.
    logging.getLogger("DeepSpeed").addFilter(_ThirdPartyNoise())
    failed: list[BaseException] = []

    def work() -> None:
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=work, name="medcap-import-backends")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


class _ThirdPartyNoise(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning and
    DeepSpeed's "Setting accelerator to CPU"."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return (
            "gemm_4bit_forward from kernels-community" not in text
            and "Setting accelerator to CPU" not in text
        )


def build_model(
    cfg: ModelConfig, verbose: bool = True, meta: bool = False, *, adapters: AdapterSetup | None = None
) -> tuple[Any, Any]:
    """Build the model and its processor as ``cfg`` says, with PEFT and trainable flags applied.

    Returns ``(model, processor)``. The model is a ``PeftModel`` when ``cfg.peft.method`` is not
    ``none``, and in eval mode (call ``model.train()`` to train). ``model.medcap_config`` holds
    ``cfg``, ``model.medcap_family`` the family and ``model.medcap_lora_modules`` the names of the
    modules that got adapters. Prints the trainable and total parameter counts (``verbose``).

    ``meta=True`` builds on the meta device from the tiny, shipped or local config: shapes only, no
    memory and no weights, for parameter counts and memory planning (quantization is not applied).

    ``adapters`` gives the adapter what it may need besides the config (``AdapterSetup``): the run's
    step count (AdaLoRA), training batches and a cache folder (EVA, CorDA), or the checkpoint whose
    adapter is about to be loaded (then no init is computed). Meta builds compute no init either.
    """
    import_backends()  # before the clock starts (the build time excludes imports), see there for why here
    return _build_model(cfg, verbose, meta, adapters)


def _build_model(
    cfg: ModelConfig, verbose: bool, meta: bool, adapters: AdapterSetup | None
) -> tuple[Any, Any]:
    start = time.perf_counter()
    family = resolve_family(cfg)
    if meta and cfg.quantization != "none":
        cfg = dataclasses.replace(cfg, quantization="none")
    loftq = (
        cfg.peft.init == "loftq"
        and not meta
        and (adapters is None or (adapters.checkpoint is None and adapters.compute_init))
    )
    if loftq:
        check_loftq_device()  # before minutes of building
    random_base = cfg.name_or_path in family.tiny_names or cfg.random_init
    # LoftQ reads the full-precision weights of the 4-bit base: a random base keeps its temporary save.
    weights = tempfile.TemporaryDirectory(prefix="medcap-loftq-") if loftq and random_base else None
    with weights if weights is not None else contextlib.nullcontext():
        keep = weights.name if weights is not None else None
        model, processor = _build_and_adapt(cfg, family, meta, adapters, keep, start, verbose)
    return model, processor


def _build_and_adapt(
    cfg: ModelConfig,
    family: ModelFamily,
    meta: bool,
    adapters: AdapterSetup | None,
    keep_weights_in: str | None,
    start: float,
    verbose: bool,
) -> tuple[Any, Any]:
    model, processor, how = _build_base(cfg, family, meta, keep_weights_in)
    family.finish_build(model, processor, cfg, how=how)

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
    _no_input_grad_hooks(model, cfg)

    matched: list[str] = []
    if cfg.peft.method != "none":
        # On meta, create the adapters on meta too (no initialisation work for shapes-only builds).
        local = Path(cfg.name_or_path).expanduser()
        loftq_weights = keep_weights_in or (str(local) if local.is_dir() else None)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model, matched = apply_peft(
                model,
                cfg,
                family,
                processor=processor,
                setup=adapters,
                meta=meta,
                loftq_weights=loftq_weights,
            )
        _no_input_grad_hooks(model, cfg)
    set_trainable(model, cfg, family)

    _no_cache_in_training(model, family)
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
            f"model {cfg.name_or_path} ({family.name}, {cfg.precision}, quantization {cfg.quantization}): "
            f"{total / 1e6:,.2f}M parameters, {trainable / 1e6:,.3f}M trainable "
            f"({100 * trainable / max(total, 1):.3f}%), built in {seconds:.1f} s"
        )
        if cfg.peft.method != "none":
            steps = adapters.train_steps if adapters is not None else None
            scopes = ", ".join(f"{k} {v}" for k, v in scope_counts(matched, cfg.peft, family).items())
            print(
                f"peft {describe(cfg.peft, steps)} on {len(matched)} modules ({scopes}): {summarize(matched)}"
            )
    return model, processor


def _build_base(
    cfg: ModelConfig, family: ModelFamily, meta: bool, keep_weights_in: str | None = None
) -> tuple[Any, Any, str]:
    """The model and processor before PEFT / trainable flags, and how they were made."""
    dtype = DTYPES[cfg.precision]
    model_class = family.model_class()
    if cfg.name_or_path in family.tiny_names or cfg.random_init or meta:
        tokenizer = family.offline_tokenizer()
        config = family.architecture(cfg, tokenizer)
        processor = family.processor(tokenizer, config)
        if meta:
            return meta_model(model_class, config, dtype, family.fp32_prefixes), processor, "meta"

        def random_model() -> Any:
            return materialize_random(model_class, config, dtype, cfg.init_seed, family.fp32_prefixes)

        if cfg.quantization != "none":
            # Built and dropped inside, so that no caller's name keeps the 16-bit model.
            model = quantize_in_memory(random_model, cfg, model_class, family.quant_skip, keep_weights_in)
            if cfg.quantization == "4bit":
                cpu_safe_4bit_layers(model)
        else:
            model = random_model()
        return model, processor, "random"
    # Pretrained weights: a hub id (the real code path; nothing downloads in tests) or a folder.
    check_hub_model(cfg.name_or_path)
    model = model_class.from_pretrained(cfg.name_or_path, **pretrained_kwargs(cfg, family.quant_skip))
    if cfg.quantization == "4bit":
        cpu_safe_4bit_layers(model)
    return model, family.pretrained_processor(cfg.name_or_path, model), "pretrained"


def _no_input_grad_hooks(model: Any, cfg: ModelConfig) -> None:
    """Remove the hooks that make input embeddings' outputs require grad.

    transformers' gradient checkpointing, and peft after it, hook the input embeddings of EVERY
    sub-model (the vision tower's patch embedding too) so that their outputs require grad: what
    reentrant checkpointing needs, never the non-reentrant kind used here. With them a frozen
    vision tower joins the autograd graph: measured on the full-size SmolVLM-2B, 1.5 GB of kept
    activations and a backward pass through 27 frozen layers for LoRA on the language model alone;
    BLIP-2's ViT-g the same. Called after each step that adds them (each replaces the stored list).
    """
    if cfg.gradient_checkpointing:
        unwrap(model).disable_input_require_grads()


def _no_train_cache(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Forward pre-hook: no KV cache while training (see ``_no_cache_in_training``)."""
    if module.training and torch.is_grad_enabled() and kwargs.get("use_cache") is None:
        kwargs["use_cache"] = False
    return args, kwargs


def _no_cache_in_training(model: Any, family: ModelFamily) -> None:
    """Make training forwards of the language model build no KV cache.

    Language models default to ``use_cache=True``: without gradient checkpointing a training forward
    builds a ``DynamicCache`` holding every layer's keys and values and returns it with the logits
    (b x s x 2 x layers x hidden, 1.6 GiB for BLIP2-OPT-6.7B at batch 32 and 100 tokens), memory that
    nothing reads. Generation (``generate`` runs under ``no_grad``), eval forwards and an explicit
    ``use_cache=`` argument are left alone.
    """
    lm = family.language_model(unwrap(model))
    if lm is not None and not getattr(lm, "_medcap_no_train_cache", False):
        lm.register_forward_pre_hook(_no_train_cache, with_kwargs=True)
        lm._medcap_no_train_cache = True


__all__ = ["DTYPES", "build_model", "import_backends"]
