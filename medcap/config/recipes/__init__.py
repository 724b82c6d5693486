"""The shipped run configs (``medcap configs`` lists them), found by name or by path.

They are package data, so a wheel install runs the demo and the recipes without a clone of medcap:
``medcap train --config blip2-opt-6.7b-lora-v100`` is the file ``blip2-opt-6.7b-lora-v100.yaml``
next to this module. Each file starts with the command that runs it and says which GPU it is for.
"""

from __future__ import annotations

from pathlib import Path

from medcap.config.loader import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent
ACCELERATE_DIR = RECIPES_DIR / "accelerate"


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of every shipped run config, sorted by name."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def accelerate_configs() -> dict[str, Path]:
    """``{name: path}`` of the shipped accelerate configs (ddp, fsdp2, deepspeed-zero2, deepspeed-zero3):
    what ``accelerate launch --config_file`` takes to train on several GPUs."""
    return {p.stem: p for p in sorted(ACCELERATE_DIR.glob("*.yaml"))}


def accelerate_config(name: str) -> Path:
    """The shipped accelerate config of that name; an unknown name lists the shipped ones."""
    shipped = accelerate_configs()
    key = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    if key not in shipped:
        raise ConfigError(
            f"no shipped accelerate config {name!r}; shipped: {', '.join(shipped)} (medcap configs --accelerate)"
        )
    return shipped[key]


def describe(path: Path) -> str:
    """What the config is for: the first sentence of the comment under its command line."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (not text and words):
            break
        words += text.split()
    sentence = " ".join(words)
    if ". " in sentence:
        sentence = sentence[: sentence.index(". ")]
    return sentence.rstrip(".")


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML path as given (when it exists), else the shipped config of that name.

    ``demo``, ``demo.yaml`` and ``configs/demo.yaml`` (the path in a clone before the configs moved
    into the package) all find the shipped file. An unknown name lists the shipped ones.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and (len(path.parts) == 1 or path.parent.name == "configs"):
        return shipped[name]
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise ConfigError(
            f"config file {path} does not exist; shipped configs, usable by name: {', '.join(shipped)}"
        )
    raise ConfigError(
        f"config {name_or_path!r} is neither a YAML file nor a shipped config; shipped configs: "
        f"{', '.join(shipped)} (medcap configs lists them)"
    )


__all__ = [
    "ACCELERATE_DIR",
    "RECIPES_DIR",
    "accelerate_config",
    "accelerate_configs",
    "describe",
    "resolve_config",
    "shipped_configs",
]
