"""Offline, a hub model that is not cached fails within seconds with what to do, and a missing image
is said before any model loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from medcap.cli import main
from medcap.model.hub import HubUnreachableError, check_hub_model


def test_an_uncached_hub_model_fails_fast_naming_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # No hub can be reached from this machine or CI: the real situation, not a mock.
    t0 = time.perf_counter()
    with pytest.raises(
        HubUnreachableError, match=r"cannot be reached from this machine: give a local folder"
    ):
        check_hub_model("Salesforce/blip2-opt-2.7b")
    assert time.perf_counter() - t0 < 5  # transformers alone retried for about a minute
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        HubUnreachableError, match=r"not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"
    ):
        check_hub_model("Salesforce/blip2-opt-2.7b")
    check_hub_model(str(Path(__file__).parent))  # a local folder is never checked against the hub


def test_caption_with_an_unreachable_hub_model_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["caption", str(image), "--model", "Salesforce/blip2-opt-2.7b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached from this machine" in err and "HF_HUB_OFFLINE" in err


def test_a_missing_image_is_said_before_the_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    import medcap.infer.generate as generate

    def must_not_load(**kwargs):
        raise AssertionError("the model was loaded for a file that does not exist")

    monkeypatch.setattr(generate, "load_captioner", must_not_load)
    assert main(["caption", str(tmp_path / "missing.jpg"), "--model", "tiny"]) == 1
    assert "missing.jpg does not exist" in capsys.readouterr().err


def test_bitsandbytes_optional_kernel_warning_is_silenced() -> None:
    """bitsandbytes' CPU backend warns on import that the optional `kernels` package is missing;
    medcap's commands import it through ``import_backends``, which drops that one line."""
    import subprocess
    import sys

    from tests.fixtures import SUBPROCESS_ENV

    repo = str(Path(__file__).resolve().parents[2])
    env = {**SUBPROCESS_ENV, "PYTHONPATH": repo}
    plain = "import bitsandbytes"
    medcap = (
        "from medcap.model.build import import_backends; import_backends(); import bitsandbytes; print('ok')"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for code in (plain, medcap)
    ]
    (_, plain_err), (medcap_out, medcap_err) = (r.communicate(timeout=300) for r in runs)
    # The control: without medcap's filter the line is there (else this test could not fail).
    assert "gemm_4bit_forward" in plain_err
    assert medcap_out.strip() == "ok" and "gemm_4bit_forward" not in medcap_err, medcap_err
