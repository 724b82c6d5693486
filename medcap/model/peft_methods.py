"""Every PEFT method medcap offers, built through peft itself: the peft config for ``model.peft``,
the adapter on the family's targets, and the inits that need more than the weights.

    method   lora dora rslora (init default pissa olora eva corda loftq) | adalora | vera | ia3 | oft | boft
    + peft.train_norms (the norm layers of the adapted blocks, peft's modules_to_save)
    + train.loraplus_ratio (peft's create_loraplus_optimizer, in medcap.train.optim)

What each init needs besides the weights:

* pissa, olora: nothing, but they rewrite the adapted base weights to W - scale * B0 A0; the
  initial adapter (A0, B0) is kept on the model (``medcap_adapter_init``) and written to every
  checkpoint, so that loading restores that residual base (``medcap.model.peft_state``);
* eva, corda: statistics of the layer inputs on ``peft.init_batches`` training batches
  (``AdapterSetup.calibration``), cached in RUN/peft_init/ with the key they were computed for;
  corda rewrites the base like pissa;
* loftq: the full-precision weights of the 4-bit base (a local folder, the hub cache, or the random
  model's temporary save) and a CUDA device (peft computes it there only).

A model rebuilt for a checkpoint (``AdapterSetup.checkpoint``) skips every init: its shapes come from
the checkpoint's adapter_config.json (EVA's per-layer ranks) and its weights from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medcap.config.loader import ConfigError
from medcap.config.model import BASE_REWRITING_INITS, DATA_DRIVEN_INITS, LORA_METHODS
from medcap.model.family import ModelFamily

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig, PeftSettings

#: AdaLoRA's total_step when the model is not built for training (inference, planning): peft needs
#: one, and the schedule is never run then.
ADALORA_STEPS_NOT_TRAINING = 1000

#: EVA cycles over the calibration batches until every layer's SVD has converged; more passes than
#: this over them means it will not (the data is too small or too uniform for peft.eva_tau).
EVA_MAX_PASSES = 20


@dataclass
class AdapterSetup:
    """What building an adapter may need besides the model config (``build_model(..., adapters=)``)."""

    train_steps: int | None = None
    """Optimizer steps of the run: AdaLoRA's allocation schedule follows them."""
    calibration: Callable[[Any, int | None], list[dict[str, Any]]] | None = None
    """``calibration(processor, examples_per_batch)``: ``peft.init_batches`` x the training batch size of
    training examples for EVA / CorDA, collated in batches of ``examples_per_batch`` (None: the
    training batch size). Called only when the cache in ``cache_dir`` does not match."""
    cache_dir: Path | None = None
    """Where EVA / CorDA statistics are cached (``RunLayout.peft_init``)."""
    cache_key: dict[str, Any] = field(default_factory=dict)
    """What the statistics depend on besides the model config: the training manifest, batch size, seed."""
    checkpoint: Path | None = None
    """Rebuild the adapter this checkpoint holds: shapes from its adapter_config.json, no init
    computed (the checkpoint's weights and initial adapter replace it)."""
    compute_init: bool = True
    """False: the adapter starts at peft's default whatever ``model.peft.init`` says (its weights are
    loaded afterwards, or do not matter, as for caching image features). A checkpoint implies it."""
    show_progress: bool = True
    """Progress bars for reading calibration batches and computing statistics."""


# ------------------------------------------------------------------------------------------------
# which modules
# ------------------------------------------------------------------------------------------------


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm / RMSNorm layers of any transformers model (T5LayerNorm, Qwen2RMSNorm, ...)."""
    name = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))


def norm_modules(model: torch.nn.Module, adapted: list[str]) -> list[str]:
    """The norm layers inside the modules that hold an adapter: those whose parent is an ancestor of
    an adapted layer (a decoder block's norms, the stack's final norm), never those of a part
    without adapters (the vision tower's when only the language model is adapted)."""
    parents = {n.rsplit(".", 1)[0] for n in adapted}
    out = []
    for name, module in model.named_modules():
        if not is_norm(module) or "." not in name:
            continue
        parent = name.rsplit(".", 1)[0]
        if any(p == parent or p.startswith(parent + ".") for p in parents):
            out.append(name)
    return out


def adapter_parameter_names(model: Any) -> set[str]:
    """Names of the PEFT adapter's own parameters (what peft saves in ``adapter/``): the tuner's (by
    its prefix: lora_, ia3_, vera_lambda_, oft_, boft_) and the trained copies of peft's
    ``modules_to_save`` (``peft.train_norms``)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return set()
    prefix = model.base_model.prefix
    return {n for n, _ in model.named_parameters() if prefix in n or ".modules_to_save." in n}


def adapter_parameter_count(cfg: ModelConfig, model: Any, matched: list[str]) -> int:
    """Trainable parameters of ``cfg``'s adapter on ``model`` (a base without adapters; ``matched``: the
    adapted modules), for the planner: counted by peft itself on a meta-device build, except BOFT,
    which peft cannot build on the meta device (its blocks, boft_R (factors, in/block, block, block),
    and its output scale boft_s, from the shapes)."""
    if cfg.peft.method == "boft":
        modules = dict(model.named_modules())
        count = sum(
            cfg.peft.butterfly_factor * modules[n].in_features * cfg.peft.block_size + modules[n].out_features
            for n in matched
        )
        if cfg.peft.train_norms:
            count += sum(p.numel() for n in norm_modules(model, matched) for p in modules[n].parameters())
        return count
    from medcap.model.build import build_model

    peft_model, _ = build_model(cfg, verbose=False, meta=True)
    names = adapter_parameter_names(peft_model)
    return sum(p.numel() for n, p in peft_model.named_parameters() if n in names and p.requires_grad)


def tuner_layers(model: Any) -> list[str]:
    """Names (in the base model) of the layers that hold an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return [
        n.removeprefix(prefix)
        for n, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and n.startswith(prefix)
    ]


# ------------------------------------------------------------------------------------------------
# the peft config
# ------------------------------------------------------------------------------------------------


def adalora_schedule(settings: PeftSettings, steps: int) -> dict[str, int]:
    """AdaLoRA's phases in optimizer steps of this run: warm-up (tinit), final (tfinal), interval."""
    return {
        "total_step": steps,
        "tinit": int(settings.adalora_warmup * steps),
        "tfinal": int(settings.adalora_final * steps),
        "deltaT": settings.adalora_interval,
    }


def peft_config(
    settings: PeftSettings,
    target: Any,
    matched: list[str],
    family: ModelFamily,
    *,
    init: str,
    norms: list[str],
    train_steps: int | None,
) -> Any:
    """The peft config of ``settings.method`` on ``target`` (``init`` may differ from the settings':
    "default" when the weights come from a checkpoint)."""
    import peft

    modules_to_save = norms or None
    method = settings.method
    if method == "ia3":
        ff_names = family.feedforward_names
        if isinstance(target, str):
            ff = [n for n in matched if n.rsplit(".", 1)[-1] in ff_names]
            target = matched  # explicit names so feedforward_modules can be a subset of them
        else:
            ff = [t for t in target if t.rsplit(".", 1)[-1] in ff_names]
        return peft.IA3Config(target_modules=target, feedforward_modules=ff, modules_to_save=modules_to_save)
    if method == "vera":
        return peft.VeraConfig(
            r=settings.r,
            target_modules=target,
            vera_dropout=settings.dropout,
            save_projection=True,  # the shared random projections travel with the adapter
            modules_to_save=modules_to_save,
        )
    if method == "oft":
        return peft.OFTConfig(
            r=0,
            oft_block_size=settings.block_size,
            module_dropout=settings.dropout,
            target_modules=target,
            modules_to_save=modules_to_save,
        )
    if method == "boft":
        return peft.BOFTConfig(
            boft_block_size=settings.block_size,
            boft_n_butterfly_factor=settings.butterfly_factor,
            boft_dropout=settings.dropout,
            target_modules=target,
            modules_to_save=modules_to_save,
        )
    if method == "adalora":
        steps = train_steps if train_steps is not None else ADALORA_STEPS_NOT_TRAINING
        return peft.AdaLoraConfig(
            init_r=settings.r,
            target_r=settings.adalora_target_r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=target,
            orth_reg_weight=settings.adalora_orth_reg,
            modules_to_save=modules_to_save,
            **adalora_schedule(settings, steps),
        )
    if method not in LORA_METHODS:  # pragma: no cover - the config's Literal lists every method
        raise ConfigError(f"model.peft.method {method!r} is not supported")
    extra: dict[str, Any] = {}
    init_weights: bool | str = True
    if init == "pissa":
        init_weights = "pissa" if settings.pissa_iters is None else f"pissa_niter_{settings.pissa_iters}"
    elif init == "olora":
        init_weights = "olora"
    elif init == "eva":
        init_weights = "eva"
        extra["eva_config"] = peft.EvaConfig(rho=settings.eva_rho, tau=settings.eva_tau)
    elif init == "corda":
        init_weights = "corda"
        from peft.tuners.lora.config import CordaConfig

        extra["corda_config"] = CordaConfig(corda_method=settings.corda_mode)
    # loftq: peft's replace_lora_weights_loftq sets A and B after the adapter exists (apply_adapter).
    return peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        use_dora=method == "dora",
        use_rslora=method == "rslora",
        bias="none",
        init_lora_weights=init_weights,
        modules_to_save=modules_to_save,
        **extra,
    )


def _checkpoint_shapes(config: Any, checkpoint: Path) -> None:
    """Per-layer ranks and scalings (EVA redistributes them, and drops layers given rank 0) from the
    adapter_config.json a checkpoint was saved with."""
    path = checkpoint / "adapter" / "adapter_config.json"
    if not path.is_file() or not hasattr(config, "rank_pattern") or type(config).__name__ != "LoraConfig":
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    config.rank_pattern = saved.get("rank_pattern") or {}
    config.alpha_pattern = saved.get("alpha_pattern") or {}
    targets = saved.get("target_modules")
    if isinstance(targets, list):  # EVA's pruned list (a regex string is the config's own)
        config.target_modules = set(targets)


# ------------------------------------------------------------------------------------------------
# building the adapter
# ------------------------------------------------------------------------------------------------


def apply_adapter(
    model: Any,
    cfg: ModelConfig,
    family: ModelFamily,
    target: Any,
    matched: list[str],
    *,
    processor: Any = None,
    setup: AdapterSetup | None = None,
    meta: bool = False,
    loftq_weights: str | None = None,
) -> Any:
    """Wrap ``model`` with the adapter ``cfg.peft`` asks for and run its init; returns the PeftModel.

    ``processor`` is needed by the data-driven inits (to collate calibration batches);
    ``loftq_weights``: where the full-precision weights of a 4-bit base are (LoftQ).
    """
    from peft import get_peft_model

    settings = cfg.peft
    setup = setup or AdapterSetup()
    from_checkpoint = setup.checkpoint is not None
    init = "default" if (meta or from_checkpoint or not setup.compute_init) else settings.init
    norms = norm_modules(model, matched) if settings.train_norms else []
    if settings.train_norms and not norms:
        raise ConfigError(
            f"model.peft.train_norms: no LayerNorm / RMSNorm inside the blocks that {settings.targets!r} "
            "adapts; unset it or adapt other modules"
        )
    config = peft_config(
        settings, target, matched, family, init=init, norms=norms, train_steps=setup.train_steps
    )
    if from_checkpoint:
        _checkpoint_shapes(config, setup.checkpoint)
    if init == "corda":
        from medcap.model.peft_inits import corda_statistics

        corda_statistics(model, config, cfg, family, processor, setup, matched)
    if init == "loftq":
        check_loftq_device()
    if settings.method in ("oft", "boft"):
        check_rotation_blocks(model, matched, settings)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft's own checks (an OFT block size that divides no input size ...)
        raise ConfigError(
            f"model.peft: peft refuses {settings.method} on these modules: {e}. Adapt other modules (the "
            f"{family.name} family's presets: {', '.join(family.target_presets)}) or choose another method"
        ) from None
    if init == "eva":
        from medcap.model.peft_inits import eva_init

        eva_init(peft_model, cfg, family, processor, setup, matched)
    elif init == "loftq":
        from peft import replace_lora_weights_loftq

        replace_lora_weights_loftq(peft_model, model_path=loftq_weights)
    peft_model.medcap_adapter_init = initial_adapter(peft_model) if init in BASE_REWRITING_INITS else None
    return peft_model


def check_loftq_device() -> None:
    """peft computes LoftQ on CUDA (or XPU) only: its tensors are moved there unconditionally."""
    xpu = getattr(torch, "xpu", None)
    if not (torch.cuda.is_available() or (xpu is not None and xpu.is_available())):
        raise ConfigError(
            "model.peft.init loftq: peft computes LoftQ on a CUDA (or XPU) device only and this machine has "
            "none; train on a GPU, or use init default (QLoRA) here"
        )


def check_rotation_blocks(model: Any, matched: list[str], settings: PeftSettings) -> None:
    """OFT / BOFT rotate each layer's input in blocks of ``block_size``: it must divide every adapted
    layer's input size (peft's OFT would silently pick another size), and BOFT's butterfly factors
    need peft's CUDA extension (without it peft silently falls back to one factor)."""
    sizes = sorted({model.get_submodule(n).in_features for n in matched})
    bad = [n for n in sizes if n % settings.block_size]
    if bad:
        fits = [b for b in (2, 4, 8, 16, 32, 64, 128, 256) if all(n % b == 0 for n in sizes)]
        raise ConfigError(
            f"model.peft.block_size {settings.block_size} does not divide the input size of every adapted "
            f"layer ({', '.join(map(str, sizes))}); choose one that does ({', '.join(map(str, fits)) or 'none'})"
        )
    if settings.method == "boft" and settings.butterfly_factor > 1:
        from peft.tuners.boft.layer import get_fbd_cuda

        if not get_fbd_cuda():
            raise ConfigError(
                f"model.peft.butterfly_factor {settings.butterfly_factor}: peft builds BOFT's butterfly factors "
                "only with its CUDA extension (fbd_cuda, compiled with ninja and the CUDA toolkit), which is not "
                "available here, and would silently use 1; set butterfly_factor 1 (block-diagonal rotations)"
            )


def initial_adapter(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights as peft saves them (``adapter_model.safetensors`` keys), copied to the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def needs_calibration(settings: PeftSettings) -> bool:
    """Whether the method reads training batches before training (EVA, CorDA)."""
    return settings.init in DATA_DRIVEN_INITS


def describe(settings: PeftSettings, train_steps: int | None = None) -> str:
    """One line naming the method and the settings that shape it (printed with the parameter counts)."""
    s = settings
    parts = [s.method]
    if s.method in LORA_METHODS:
        parts.append(f"r={s.r} alpha={s.alpha:g}")
        if s.init != "default":
            parts.append(f"init {s.init}" + (f" ({s.pissa_iters} SVD iterations)" if s.pissa_iters else ""))
    elif s.method == "adalora":
        line = f"rank {s.r} -> {s.adalora_target_r} on average"
        if train_steps is not None:
            sched = adalora_schedule(s, train_steps)
            line += (
                f" (prunes from step {sched['tinit']} to {train_steps - sched['tfinal']} of {train_steps}, "
                f"every {sched['deltaT']})"
            )
        parts.append(line)
    elif s.method == "vera":
        parts.append(f"shared projections of rank {s.r}")
    elif s.method in ("oft", "boft"):
        parts.append(f"blocks of {s.block_size}")
        if s.method == "boft":
            parts.append(f"{s.butterfly_factor} butterfly factor(s)")
    if s.train_norms:
        parts.append("+ norm layers")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# the statistics cache (EVA, CorDA)
# ------------------------------------------------------------------------------------------------


def cache_key(cfg: ModelConfig, matched: list[str], setup: AdapterSetup) -> dict[str, Any]:
    """What EVA / CorDA statistics depend on: the base model, the adapted layers, the method's
    settings and the data (``setup.cache_key``)."""
    s = cfg.peft
    return {
        "init": s.init,
        "model": cfg.name_or_path,
        "init_seed": cfg.init_seed,
        "precision": cfg.precision,
        "quantization": cfg.quantization,
        "image_size": cfg.image_size,
        "prompt": cfg.prompt,
        "r": s.r,
        "settings": {"eva_rho": s.eva_rho, "eva_tau": s.eva_tau}
        if s.init == "eva"
        else {"corda_mode": s.corda_mode},
        "init_batches": s.init_batches,
        "layers": hashlib.sha256("\n".join(sorted(matched)).encode()).hexdigest()[:16],
        **setup.cache_key,
    }


def cached(setup: AdapterSetup, name: str, key: dict[str, Any]) -> Path | None:
    """The cache file ``name`` when it was computed for ``key``; a stale one is removed."""
    if setup.cache_dir is None:
        return None
    path, key_path = setup.cache_dir / name, setup.cache_dir / f"{name}.key.json"
    if path.is_file() and key_path.is_file():
        try:
            if json.loads(key_path.read_text(encoding="utf-8")) == json.loads(json.dumps(key, default=str)):
                return path
        except ValueError:
            pass
    path.unlink(missing_ok=True)
    key_path.unlink(missing_ok=True)
    return None


def write_key(setup: AdapterSetup, name: str, key: dict[str, Any]) -> None:
    """Record what the cache file ``name`` was computed for (written after the file itself)."""
    assert setup.cache_dir is not None
    tmp = setup.cache_dir / f".{name}.key.json.{os.getpid()}"
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(setup.cache_dir / f"{name}.key.json")


def model_inputs(batch: dict[str, Any], decoder_only: bool) -> dict[str, Any]:
    """A collated batch as the model's forward takes it (labels only for encoder-decoder models,
    which build their decoder inputs from them)."""
    drop = {"ids", "captions"} | ({"labels"} if decoder_only else set())
    return {k: v for k, v in batch.items() if k not in drop}


def layer_rows(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The rows of a layer's input that statistics are taken from: the real tokens when the layer
    sees the model's token sequence (its attention mask fits), else every position (the Q-Former's
    queries, a decoder's label positions)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    mask = model_input.get("attention_mask") if isinstance(model_input, dict) else None
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


__all__ = [
    "ADALORA_STEPS_NOT_TRAINING",
    "adapter_parameter_count",
    "adapter_parameter_names",
    "AdapterSetup",
    "adalora_schedule",
    "apply_adapter",
    "check_loftq_device",
    "check_rotation_blocks",
    "describe",
    "initial_adapter",
    "is_norm",
    "needs_calibration",
    "norm_modules",
    "peft_config",
    "tuner_layers",
]
