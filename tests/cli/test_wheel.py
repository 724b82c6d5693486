"""The built wheel carries everything a user without a clone needs: the shipped configs (by name),
the model assets and the web page; installed into a new virtual environment it runs the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # No build isolation: the build uses this environment's setuptools instead of downloading one.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (found,) = dist.glob("medcap-*.whl")
    return found


def test_the_wheel_carries_the_configs_assets_and_web_page(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "medcap/config/recipes/demo.yaml",
        "medcap/config/recipes/blip2-opt-6.7b-lora-v100.yaml",
        "medcap/model/assets/tokenizer/tokenizer.json",
        "medcap/model/assets/blip2-opt-6.7b/config.json",
        "medcap/infer/serve/static/index.html",
    ):
        assert needed in names, f"{needed} is not in {wheel.name}"


def test_the_wheel_in_a_new_venv_runs_the_demo_and_the_recipes_by_name(wheel: Path, tmp_path: Path) -> None:
    # The new environment sees nothing of this one but the dependencies (.pth below): no PYTHONPATH.
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            env=run_env,
        ).stdout.strip()
    )
    # The dependencies come from this environment (nothing is downloaded); medcap itself only from the
    # wheel: a path added by a .pth file is not a site directory, so this environment's editable
    # medcap hook is not loaded there.
    (site / "medcap_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, env=run_env
    )
    work = tmp_path / "elsewhere"  # not a clone: no configs/ folder, no repo on the path
    work.mkdir()

    def medcap(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [env / "bin" / "medcap", *args],
            cwd=work,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = subprocess.run(
        [py, "-c", "import medcap; print(medcap.__file__)"],
        cwd=work,
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(env) in where, where
    listed = medcap("configs")
    assert listed.returncode == 0 and "blip2-opt-6.7b-lora-v100" in listed.stdout and "demo" in listed.stdout
    shown = medcap("train", "--config", "blip2-opt-6.7b-lora-v100", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert "name_or_path: Salesforce/blip2-opt-6.7b" in shown.stdout
    demo = medcap(
        "run",
        "--out",
        "demo",
        "--n",
        "40",
        "--train.max_steps",
        "2",
        "--train.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--train.report_to",
        "csv",
        "--train.progress_bar",
        "false",
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (work / "demo" / "run" / "report.html").is_file()
    assert (work / "demo" / "run" / "predictions" / "test.csv").is_file()
