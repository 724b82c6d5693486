"""The model-family layer: one protocol, one table of families, and no BLIP-2 class named outside the
BLIP-2 family's own package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import medcap
from medcap.config.loader import ConfigError
from medcap.config.model import ModelConfig, PeftSettings
from medcap.model.families import FAMILIES, family_names, get_family, preset_names, resolve_family
from medcap.model.family import ModelFamily

PACKAGE = Path(medcap.__file__).resolve().parent


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_speaks_the_protocol(family) -> None:
    assert isinstance(family, ModelFamily)
    assert family.target_presets and all(isinstance(v, str) for v in family.target_presets.values())
    assert get_family(family.name) is family
    for name in family.tiny_names:
        assert resolve_family(ModelConfig(name_or_path=name, peft=PeftSettings(method="none"))) is family


def _names_outside(package: Path, pattern: str) -> list[str]:
    """Names matching ``pattern`` (identifiers, attributes, imports, strings) in medcap outside ``package``."""
    regex = re.compile(pattern)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if package in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.alias):
                names = [node.name]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = regex.findall(node.value)
            offenders += [
                f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')} {n}"
                for n in names
                if regex.fullmatch(n)
            ]
    return offenders


def test_no_blip2_class_is_named_outside_its_family_package() -> None:
    """The loop, predict, caption, serve, export, features and plan talk only to the interface."""
    assert not _names_outside(PACKAGE / "model" / "families" / "blip2", r"Blip2\w+")


@pytest.mark.parametrize(
    ("package", "pattern"),
    [
        ("qwen_vl", r"Qwen(2_5_VL|3VL|2VL)\w+"),
        ("llava_next", r"LlavaNext\w+"),
        ("paligemma", r"PaliGemma\w+"),
        ("gemma3", r"Gemma3\w+"),
        ("idefics3", r"Idefics3\w+"),
        ("instructblip", r"InstructBlip\w+"),
    ],
)
def test_no_family_class_is_named_outside_its_package(package, pattern) -> None:
    assert not _names_outside(PACKAGE / "model" / "families" / package, pattern)


def test_unknown_families_and_models_are_refused_with_the_supported_list(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model.family: 'llava' is not a supported family; supported: auto, blip2-opt"
    ):
        ModelConfig(name_or_path="tiny", family="llava")
    with pytest.raises(
        ConfigError,
        match=r"not one medcap knows; supported families: blip2-opt \(.*\), blip2-t5 \(.*\), qwen2.5-vl \(.*"
        r"qwen3-vl \(.*llava-next \(.*paligemma \(.*gemma3 \(.*idefics3 \(.*instructblip \(.*instructblip-t5",
    ):
        resolve_family(ModelConfig(name_or_path="someone/some-vlm-7b", peft=PeftSettings(method="none")))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ConfigError, match=r"describes a 'llava' model; supported families"):
        resolve_family(ModelConfig(name_or_path=str(folder), peft=PeftSettings(method="none")))


def test_presets_are_checked_when_the_config_loads_and_against_the_family_when_built() -> None:
    assert {"lm-qv", "lm-attn", "lm-all", "qformer-qv", "qformer-attn"} <= preset_names()
    with pytest.raises(ConfigError, match="unknown preset 'lm-everything'"):
        PeftSettings(targets="lm-everything")
    assert set(family_names()) == {
        "blip2-opt",
        "blip2-t5",
        "qwen2.5-vl",
        "qwen3-vl",
        "llava-next",
        "paligemma",
        "gemma3",
        "idefics3",
        "instructblip",
        "instructblip-t5",
    }
    assert {"vision", "projector"} <= preset_names()
