"""The command table: every target exists and `--help` works without importing torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from medcap.cli import COMMANDS, main


@pytest.mark.parametrize("words", list(COMMANDS))
def test_every_command_target_exists(words: tuple[str, ...]) -> None:
    module_name, func_name = COMMANDS[words][0].split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, func_name)), f"{module_name}.{func_name} missing for {' '.join(words)}"


def test_help_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "data prepare" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_help_is_light() -> None:
    code = "import sys; from medcap.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
