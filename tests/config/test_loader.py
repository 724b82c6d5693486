"""The typed config machinery: YAML + dotted overrides, type conversion, clear errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from medcap.config.loader import ConfigError, diff_configs, load_config, parse_overrides, save_config, to_dict


@dataclass
class Inner:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    method: Literal["lora", "dora"] = "lora"


@dataclass
class Outer:
    name: str = "x"
    out: Path = Path("runs/x")
    limit: int | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.inner.r <= 0:
            raise ValueError(f"inner.r must be positive, got {self.inner.r}")


def test_yaml_and_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: demo\ninner:\n  r: 4\n  method: dora\n")
    cfg = load_config(
        Outer, cfg_file, ["--inner.alpha", "1e-1", "--flag=true", "--limit", "5", "--inner.targets", "a,b"]
    )
    assert cfg.name == "demo" and cfg.inner.r == 4 and cfg.inner.method == "dora"
    assert cfg.inner.alpha == pytest.approx(0.1) and cfg.flag is True and cfg.limit == 5
    assert cfg.inner.targets == ["a", "b"] and isinstance(cfg.out, Path)
    assert load_config(Outer, cfg_file, ["--limit", "null"]).limit is None


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Outer, None, {"inner.r": "2", "out": "a/b"})
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(Outer, tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert diff_configs(cfg, again) == []
    changed = load_config(Outer, tmp_path / "c.yaml", ["--inner.r", "3"])
    assert diff_configs(cfg, changed) == ["inner.r: 2 -> 3"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--inner.rr", "3"], "command line --inner.rr: unknown setting; did you mean --inner.r"),
        (["--inner.r", "three"], "command line --inner.r three: expected an integer"),
        (
            ["--inner.method", "qlora"],
            "command line --inner.method qlora: 'qlora' is not one of 'lora', 'dora'",
        ),
        (["--flag", "maybe"], "command line --flag maybe: expected true or false"),
        (["--inner.r", "0"], "inner.r must be positive"),
        (["inner.r", "3"], "overrides look like --section.key VALUE"),
        (["--inner.r"], "--inner.r needs a value"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(Outer, None, overrides)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Outer, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("nme: x\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: nme: unknown setting \(did you mean 'name'\?\)"):
        load_config(Outer, typo)


def test_parse_overrides_forms() -> None:
    assert parse_overrides(["--a.b", "1", "--c-d=2"]) == {"a.b": "1", "c_d": "2"}
