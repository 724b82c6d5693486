"""The model families medcap builds, by name, and how a model config finds its family.

A plain table, not a registry filled by imports: adding a family is one line in ``FAMILIES`` (and
its package next to this file; docs/ARCHITECTURE.md has the checklist). Importing this module is
cheap (no torch), so configs can check family and preset names when they load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.model.families.blip2 import BLIP2_OPT, BLIP2_T5
from medcap.model.families.gemma3 import GEMMA3
from medcap.model.families.idefics3 import IDEFICS3
from medcap.model.families.instructblip import INSTRUCTBLIP, INSTRUCTBLIP_T5
from medcap.model.families.llava_next import LLAVA_NEXT
from medcap.model.families.paligemma import PALIGEMMA
from medcap.model.families.qwen_vl import QWEN3_VL, QWEN25_VL

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig
    from medcap.model.family import ModelFamily

#: Every supported family, in the order ``auto`` tries them.
FAMILIES: tuple[ModelFamily, ...] = (
    BLIP2_OPT,
    BLIP2_T5,
    QWEN25_VL,
    QWEN3_VL,
    LLAVA_NEXT,
    PALIGEMMA,
    GEMMA3,
    IDEFICS3,
    INSTRUCTBLIP,
    INSTRUCTBLIP_T5,
)


def family_names() -> tuple[str, ...]:
    """The names ``model.family`` takes (besides ``auto``)."""
    return tuple(f.name for f in FAMILIES)


def preset_names() -> set[str]:
    """Every LoRA target preset of any family (a config is checked against its own family at build)."""
    return {name for f in FAMILIES for name in f.target_presets}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; an unknown name gets the list of supported ones."""
    from medcap.config.loader import ConfigError

    for f in FAMILIES:
        if f.name == name:
            return f
    raise ConfigError(
        f"model.family {name!r} is not supported; supported families: {', '.join(family_names())}"
    )


def config_json(name_or_path: str) -> tuple[Path | None, dict[str, Any] | None]:
    """The config.json that describes ``name_or_path`` without the hub (a local folder's, or one shipped
    with medcap for a known hub id) and its content; ``(None, None)`` for an unknown hub id."""
    from medcap.config.loader import ConfigError

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / "config.json"
    else:
        path = next((p for f in FAMILIES if (p := f.shipped_config(name_or_path)) is not None), None)
    if path is None or not path.is_file():
        return path, None
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path {name_or_path}: {path} is not readable JSON ({e})") from None


def resolve_family(cfg: ModelConfig) -> ModelFamily:
    """The family of a model config: ``model.family`` when set, else the one that claims the model
    (a tiny name, a config.json's model type, or the hub id). An unmapped model gets a clear error
    listing the supported families."""
    from medcap.config.loader import ConfigError

    if cfg.family != "auto":
        return get_family(cfg.family)
    path, config = config_json(cfg.name_or_path)
    for f in FAMILIES:
        if f.claims(cfg.name_or_path, config):
            return f
    what = (
        f"{path} describes a {config.get('model_type')!r} model"
        if config
        else "this hub id is not one medcap knows"
    )
    raise ConfigError(
        f"model.name_or_path {cfg.name_or_path}: {what}; supported families: "
        f"{', '.join(f'{f.name} ({f.description})' for f in FAMILIES)}. Set model.family to one of "
        "them if the model is of that kind"
    )


def family_of(model: Any) -> ModelFamily:
    """The family of a built model (``build_model`` sets ``medcap_family``; else its config says)."""
    from medcap.model.adapters import unwrap

    inner = unwrap(model)
    for owner in (model, getattr(model, "module", None), inner):
        family = getattr(owner, "medcap_family", None)
        if family is not None:
            return family
    config = inner.config.to_dict()
    for f in FAMILIES:
        if f.claims("", config):
            return f
    raise ValueError(f"cannot tell the family of {type(unwrap(model)).__name__}")


__all__ = [
    "BLIP2_OPT",
    "BLIP2_T5",
    "FAMILIES",
    "GEMMA3",
    "IDEFICS3",
    "INSTRUCTBLIP",
    "INSTRUCTBLIP_T5",
    "LLAVA_NEXT",
    "PALIGEMMA",
    "QWEN25_VL",
    "QWEN3_VL",
    "config_json",
    "family_names",
    "family_of",
    "get_family",
    "preset_names",
    "resolve_family",
]
