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


def test_config_and_the_light_commands_import_no_torch() -> None:
    """config imports no torch: settings load, print and list without it, as do --help and configs."""
    code = (
        "import sys, contextlib, io\n"
        "from medcap.config import load_run_config\n"
        "from medcap.cli import main\n"
        "cfg = load_run_config('blip2-opt-6.7b-lora-v100', ['--train.lr', '2e-4'])\n"
        "assert cfg.train.lr == 2e-4 and cfg.model.peft.targets == 'lm-qv'\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    main(['configs'])\n"
        "    main(['train', '--config', 'demo', '--print-config'])\n"
        "    try:\n"
        "        main(['train', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'demo' in out.getvalue() and '--train.lr' in out.getvalue()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_configs_lists_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    from medcap.config.recipes import shipped_configs

    assert main(["configs", "--path"]) == 0
    out = capsys.readouterr().out
    for name, path in shipped_configs().items():
        assert name in out and str(path) in out


def test_a_missing_optional_package_names_the_extra_to_install(tmp_path) -> None:
    """An evaluation-only or serving-only install lacks the other extras: the command says which to add."""
    import os

    blocker = tmp_path / "fastapi.py"  # stands where an absent package would be looked up
    blocker.write_text('raise ModuleNotFoundError("No module named \'fastapi\'", name="fastapi")\n')
    code = "import sys; from medcap.cli import main; sys.exit(main(['serve', '--model', 'tiny']))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "fastapi is not installed: pip install 'medcap[serve]'" in done.stderr
