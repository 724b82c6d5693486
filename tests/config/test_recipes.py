"""Every shipped config loads, validates, and opens with the command that runs it."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest
import yaml

import medcap.train.recipe as recipe
from medcap.cli.train import cmd_train as cli
from medcap.config.data import DataConfig
from medcap.config.generate import GenerateConfig
from medcap.config.loader import ConfigError, save_config, to_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.recipes import RECIPES_DIR
from medcap.config.run import RunConfig, load_run_config
from medcap.config.train import TrainConfig
from medcap.model.families import FAMILIES

CONFIGS = sorted(RECIPES_DIR.glob("*.yaml"))
REQUIRED = {
    "demo.yaml",
    "blip2-opt-6.7b-lora-v100.yaml",
    "blip2-opt-6.7b-qlora-2xt4.yaml",
    "blip2-opt-2.7b-8bit.yaml",
    "qwen2.5-vl-7b-qlora-t4.yaml",
    "llava-1.6-mistral-7b-lora.yaml",
    "paligemma2-3b-lora.yaml",
    "smolvlm-2b-lora.yaml",
    "medgemma-4b-lora.yaml",
}


def test_the_required_configs_ship() -> None:
    assert REQUIRED <= {p.name for p in CONFIGS}


def _command(path: Path) -> list[str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line must be a comment with the command"
    return shlex.split(first[2:])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_first_line_runs_it(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    words = _command(path)
    # Either `medcap train ...` or `accelerate launch [options] -m medcap train ...`.
    if words[:2] == ["accelerate", "launch"]:
        i = words.index("-m")
        assert words[i + 1 : i + 3] == ["medcap", "train"], words
        launch_opts, train_args = words[2:i], words[i + 3 :]
        assert "--num_processes" in launch_opts
    else:
        assert words[:2] == ["medcap", "train"], f"{path.name}: first line {words}"
        train_args = words[2:]
    # The config by its shipped name: what a wheel install (no clone) runs.
    assert train_args[:2] == ["--config", path.stem], train_args
    # The command line itself parses and resolves to the same config, from any folder.
    capsys.readouterr()
    assert cli([*train_args, "--print-config"]) == 0
    assert capsys.readouterr().out == yaml.safe_dump(to_dict(cfg), sort_keys=False)

    # The model is one that can be built here without the hub: tiny, or a shipped config.
    assert any(
        cfg.model.name_or_path in f.tiny_names or f.shipped_config(cfg.model.name_or_path) is not None
        for f in FAMILIES
    )
    # Saved and loaded again it is the same config (what a checkpoint keeps).
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_run_config(tmp_path / "config.yaml")) == to_dict(cfg)


def test_gpu_configs_match_their_hardware() -> None:
    """The settings the comments promise: what each card can run."""
    v100 = load_run_config(RECIPES_DIR / "blip2-opt-6.7b-lora-v100.yaml")
    assert v100.model.name_or_path == "Salesforce/blip2-opt-6.7b" and v100.model.peft.method == "lora"
    assert v100.model.peft.targets == "lm-qv" and v100.model.peft.r == 16
    assert v100.train.mixed_precision == "fp16" and v100.model.precision == "fp16"  # V100: no bf16
    assert v100.train.max_nonfinite_in_row >= 1 and v100.train.max_grad_norm is not None
    t4 = load_run_config(RECIPES_DIR / "blip2-opt-6.7b-qlora-2xt4.yaml")
    assert t4.model.quantization == "4bit" and t4.model.gradient_checkpointing
    assert t4.train.mixed_precision == "fp16" and t4.model.precision == "fp16"  # T4: no bf16
    assert "--num_processes 2" in (RECIPES_DIR / "blip2-opt-6.7b-qlora-2xt4.yaml").read_text().splitlines()[0]
    opt27 = load_run_config(RECIPES_DIR / "blip2-opt-2.7b-8bit.yaml")
    assert opt27.model.name_or_path == "Salesforce/blip2-opt-2.7b" and opt27.model.quantization == "8bit"
    demo = load_run_config(RECIPES_DIR / "demo.yaml")
    assert any(demo.model.name_or_path in f.tiny_names for f in FAMILIES) and demo.train.cpu
    assert Path(demo.data.prepared) == Path("runs/demo/prepared")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.lr", "-1"], "train.lr must be a positive number"),
        (
            ["--train.optimizer", "sgd"],
            "command line --train.optimizer sgd: 'sgd' is not one of 'adamw', 'adamw8bit'",
        ),
        (["--train.warmup_steps", "10", "--train.warmup_ratio", "0.1"], "not both"),
        (["--train.batch_size", "0"], "train.batch_size must be a positive number"),
        (["--train.lrr", "1"], "command line --train.lrr: unknown setting; did you mean --train.lr"),
        (["--train.mixed_precision", "fp8"], "command line --train.mixed_precision fp8: 'fp8' is not one of"),
        (["--train.patience", "2", "--train.eval_at_epoch_end", "false"], "train.patience needs validations"),
    ],
)
def test_bad_settings_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(RECIPES_DIR / "demo.yaml", overrides)


def test_every_setting_has_a_docstring() -> None:
    """The field docstrings are the help (medcap train --help): none may be missing, in any section."""
    for cls in (DataConfig, ModelConfig, PeftSettings, TrainConfig, GenerateConfig, RunConfig):
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        fields = [n.target.id for n in body if isinstance(n, ast.AnnAssign)]
        documented = {
            a.target.id
            for a, b in zip(body, body[1:], strict=False)
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
        }
        assert fields and set(fields) == documented, (
            f"{cls.__name__}: undocumented {set(fields) - documented}"
        )
    assert recipe.__doc__


def _family_of_config(path: Path):
    from medcap.model.families import resolve_family

    return resolve_family(load_run_config(path).model)


NEW_FAMILY_CONFIGS = [p for p in CONFIGS if not p.name.startswith(("blip2-", "demo"))]


@pytest.mark.parametrize("path", NEW_FAMILY_CONFIGS, ids=lambda p: p.name)
def test_each_family_config_dry_runs_on_its_tiny_model(path: Path, tmp_path: Path) -> None:
    """The config as shipped (quantization, pixel bounds, presets, prompt, precision) with the family's
    tiny model in place of the full-size one: two steps, a validation and a caption, through the CLI."""
    family = _family_of_config(path)
    small = [
        "--model.name_or_path",
        family.tiny_names[0],
        "--train.dry_run_images",
        "6",
        "--train.dry_run_steps",
        "2",
        "--train.dry_run_batch_size",
        "2",
        "--data.num_workers",
        "0",
        "--data.prepared",
        str(tmp_path / "absent"),
        "--train.cpu_threads",
        "1",
        "--train.progress_bar",
        "false",
        "--train.report_to",
        "csv",
        "--generate.max_new_tokens",
        "4",
        "--generate.min_new_tokens",
        "0",
        "--generate.num_beams",
        "1",
    ]
    assert cli(["--config", path.stem, "--dry-run", *small]) == 0


def test_family_configs_match_their_hardware() -> None:
    qwen = load_run_config(RECIPES_DIR / "qwen2.5-vl-7b-qlora-t4.yaml")
    assert qwen.model.quantization == "4bit" and qwen.model.precision == "fp16"  # T4: no bf16
    assert qwen.train.mixed_precision == "fp16" and qwen.model.max_pixels is not None
    smol = load_run_config(RECIPES_DIR / "smolvlm-2b-lora.yaml")
    assert smol.model.precision == "fp16" and smol.train.mixed_precision == "fp16"  # T4
    for name in ("llava-1.6-mistral-7b-lora", "paligemma2-3b-lora", "medgemma-4b-lora"):
        cfg = load_run_config(RECIPES_DIR / f"{name}.yaml")
        assert cfg.model.precision == "bf16" and cfg.train.mixed_precision == "bf16"  # Ampere or newer
    assert load_run_config(RECIPES_DIR / "paligemma2-3b-lora.yaml").model.prompt == "caption en"
