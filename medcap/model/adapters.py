"""PEFT adapters (LoRA, DoRA, rsLoRA, (IA)3) on a family's named, explicitly scoped targets, the
``model.train_*`` flags, and the parameter counts printed with them."""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any

import torch

from medcap.config.loader import ConfigError
from medcap.model.family import ModelFamily

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig, PeftSettings


def unwrap(model: Any) -> Any:
    """The family's model inside DDP / PeftModel wrappers (or the model itself)."""
    inner = getattr(model, "module", model)  # DDP
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def linear_types() -> tuple[type, ...]:
    """Linear layer classes PEFT can adapt: torch's and bitsandbytes' (imported lazily)."""
    types_: list[type] = [torch.nn.Linear]
    with contextlib.suppress(Exception):
        import bitsandbytes as bnb

        types_ += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    return tuple(types_)


def resolve_targets(
    model: torch.nn.Module, settings: PeftSettings, family: ModelFamily
) -> tuple[Any, list[str]]:
    """The ``target_modules`` for PEFT (a regex or a list) and the module names it matches.

    Presets are the family's (``family.target_presets``); a list of names is passed to PEFT as it is.
    Raises ``ConfigError`` when a preset is not the family's or nothing matches, so a typo never
    trains nothing.
    """
    if isinstance(settings.targets, str):
        names = [n.strip() for n in settings.targets.split("+")]
        missing = [n for n in names if n not in family.target_presets]
        if missing:
            raise ConfigError(
                f"model.peft.targets: {', '.join(map(repr, missing))} is not a preset of the {family.name} "
                f"family; its presets are {', '.join(family.target_presets)} (join with '+')"
            )
        pattern = "|".join(f"(?:{family.target_presets[n]})" for n in names)
        regex = re.compile(pattern)
        matched = [
            n for n, m in model.named_modules() if regex.fullmatch(n) and isinstance(m, linear_types())
        ]
        target: Any = pattern
    else:
        names = list(settings.targets)
        matched = [
            n
            for n, m in model.named_modules()
            if isinstance(m, linear_types()) and any(n == t or n.endswith("." + t) for t in names)
        ]
        target = names
    if not matched:
        raise ConfigError(f"model.peft.targets {settings.targets!r} matches no linear layer of this model")
    return target, matched


def apply_peft(model: Any, cfg: ModelConfig, family: ModelFamily) -> tuple[Any, list[str]]:
    """Wrap ``model`` with the adapter ``cfg.peft`` asks for; returns the PeftModel and the adapted modules."""
    from peft import IA3Config, LoraConfig, get_peft_model

    settings = cfg.peft
    target, matched = resolve_targets(model, settings, family)
    if settings.method == "ia3":
        ff_names = family.feedforward_names
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


#: The ``model.train_*`` flags and the family part each one trains.
TRAIN_FLAGS = {
    "train_qformer": "qformer",
    "train_vision": "vision",
    "train_language_projection": "projection",
}


def set_trainable(model: Any, cfg: ModelConfig, family: ModelFamily) -> None:
    """Turn on ``requires_grad`` for what ``cfg`` trains besides adapters: every parameter
    (``full_finetune``) or whole family parts (``train_qformer``, ``train_vision``, ...)."""
    inner = unwrap(model)
    if cfg.full_finetune:
        for p in inner.parameters():
            p.requires_grad_(True)
        return
    for flag, part in TRAIN_FLAGS.items():
        if not getattr(cfg, flag):
            continue
        prefixes = family.parts.get(part)
        if not prefixes:
            raise ConfigError(f"model.{flag}: the {family.name} family has no {part}; unset it")
        for name, p in inner.named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(True)


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


def scope_counts(names: list[str], settings: PeftSettings, family: ModelFamily) -> dict[str, int]:
    """How many of the adapted modules ``names`` each preset of ``settings.targets`` reached (a list
    of module names counts as one scope, ``modules``)."""
    if not isinstance(settings.targets, str):
        return {"modules": len(names)}
    presets = [n.strip() for n in settings.targets.split("+")]
    return {p: sum(1 for n in names if re.fullmatch(family.target_presets[p], n)) for p in presets}


def summarize(names: list[str]) -> str:
    """Module names with layer numbers folded: ``language_model.model.decoder.layers.*.self_attn.q_proj``."""
    folded = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    return ", ".join(folded)


__all__ = [
    "TRAIN_FLAGS",
    "apply_peft",
    "count_parameters",
    "linear_types",
    "resolve_targets",
    "scope_counts",
    "set_trainable",
    "summarize",
    "unwrap",
]
