"""``medcap train --help`` lists every setting of every section; a mistyped flag names the closest
setting in any section; a bad value on the command line is blamed on the command line, not the YAML."""

from __future__ import annotations

import dataclasses

import pytest

from medcap.cli import main
from medcap.config.help import field_docs, settings, suggest
from medcap.config.loader import ConfigError
from medcap.config.run import RunConfig, load_run_config


def test_help_lists_every_setting_with_its_help_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    leaves = settings(RunConfig)
    assert len(leaves) > 70  # data, model (with peft), train, generate
    for s in leaves:
        assert f"--{s.name} " in text, f"--{s.name} missing from medcap train --help"
        assert s.doc, f"{s.name} has no docstring"
    # A few by hand: the docstring and the default are printed under the flag.
    block = text.split("\n  --train.lr ", 1)[1].split("\n  --", 1)[0]
    assert "Peak learning rate" in block and "(default: 0.0001)" in block
    block = text.split("\n  --model.peft.targets ", 1)[1].split("\n  --", 1)[0]
    assert "(default: lm-qv)" in block
    for section in ("data:", "model:", "train:", "generate:"):
        assert f"\n{section}\n" in text


@pytest.mark.parametrize(
    ("flag", "closest"),
    [
        ("learning_rate", "train.lr"),
        ("lora_r", "model.peft.r"),
        ("num_train_epochs", "train.epochs"),
        ("per_device_train_batch_size", "train.batch_size"),
        ("train.lrr", "train.lr"),
        ("model.perf.r", "model.peft.r"),
        ("max_new_token", "generate.max_new_tokens"),
        ("model.preccision", "model.precision"),
    ],
)
def test_unknown_flag_names_the_closest_setting_of_any_section(flag: str, closest: str) -> None:
    assert closest in suggest(flag, RunConfig)
    with pytest.raises(
        ConfigError, match=rf"command line --{flag}: unknown setting; did you mean .*--{closest}\b"
    ):
        load_run_config("demo", [f"--{flag}", "1"])


def test_override_errors_name_the_command_line_and_file_errors_the_file(tmp_path, capsys) -> None:
    assert main(["train", "--config", "demo", "--learning_rate", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "command line --learning_rate: unknown setting; did you mean --train.lr?" in err
    assert main(["train", "--config", "demo", "--train.epochs", "many"]) == 2
    err = capsys.readouterr().err
    assert "command line --train.epochs many: expected an integer" in err and "demo.yaml" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: many\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: train.epochs: expected an integer" in capsys.readouterr().err
    # A value valid alone that clashes with the file names both sources.
    assert main(["train", "--config", "demo", "--train.warmup_ratio", "0.1"]) == 2
    assert "demo.yaml with the command-line overrides" in capsys.readouterr().err


def test_field_docs_read_docstrings_under_fields() -> None:
    @dataclasses.dataclass
    class Example:
        a: int = 1
        """The a."""
        #: The b, as a comment.
        b: str = ""

    assert field_docs(Example) == {"a": "The a.", "b": "The b, as a comment."}
