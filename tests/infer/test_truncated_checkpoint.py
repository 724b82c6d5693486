"""A checkpoint whose weight files were cut short (a full disk, an interrupted copy): ``medcap
caption`` and ``medcap serve`` say which file and what to do, instead of safetensors' traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from medcap.cli import main
from medcap.config.loader import to_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.model.build import build_model
from medcap.model.checkpoint import save_trainable


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ModelConfig(
        name_or_path="tiny", train_qformer=True, peft=PeftSettings(method="lora", r=4, targets="lm-qv")
    )
    model, _ = build_model(cfg, verbose=False)
    ckpt = tmp_path_factory.mktemp("ckpt") / "best"
    written = save_trainable(model, ckpt)
    assert {"adapter", "trainable.safetensors", "base.safetensors"} <= set(written)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}), encoding="utf-8")
    return ckpt


@pytest.mark.parametrize(
    "name", ["trainable.safetensors", "base.safetensors", "adapter/adapter_model.safetensors"]
)
def test_a_cut_short_weight_file_is_a_clear_error(
    checkpoint: Path,
    tmp_path: Path,
    name: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = checkpoint / name
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    try:
        image = tmp_path / "a.png"
        Image.new("RGB", (64, 64), (40, 90, 200)).save(image)
        assert main(["caption", "--checkpoint", str(checkpoint), "--device", "cpu", str(image)]) == 2
        err = capsys.readouterr().err
        assert f"{path} is not a complete safetensors file" in err and "copy the checkpoint again" in err
        assert "Traceback" not in err

        import uvicorn

        monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the service must not start"))
        assert main(["serve", "--checkpoint", str(checkpoint), "--device", "cpu"]) == 2
        assert f"{path} is not a complete safetensors file" in capsys.readouterr().err
    finally:
        path.write_bytes(whole)
