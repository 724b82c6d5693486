"""One image reader for every path: a JPEG with an EXIF rotation reaches the vision tower as the same
tensor in training, in ``medcap caption`` and through the service (upright in all three)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from medcap.cli import main
from medcap.config.generate import GenerateConfig
from medcap.data.images import read_image
from medcap.data.manifest import ManifestRow
from medcap.infer.serve.app import create_app
from medcap.infer.serve.loading import load_for_serving
from medcap.model.families import family_of
from medcap.train.batches import CaptionDataset


def _rotated_jpeg(path: Path) -> np.ndarray:
    """A 120 x 80 picture with a bright top-left corner, stored turned 90 degrees with EXIF
    Orientation 6 ("rotate 90 clockwise to display"), as phones and some scanners write it.
    Returns the upright picture's pixels."""
    upright = np.zeros((80, 120, 3), np.uint8)
    upright[:30, :40] = (250, 240, 230)  # top-left corner
    upright[60:, 90:, 2] = 200  # a blue bottom-right corner
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif)
    return upright


@pytest.fixture
def vision_inputs(monkeypatch):
    """Every pixel tensor that reaches the tiny model's vision tower, in order (whichever model object
    the path builds: the caption command builds its own)."""
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel

    seen: list[torch.Tensor] = []
    forward = Blip2VisionModel.forward

    def recording(self, pixel_values=None, *args, **kwargs):
        seen.append(pixel_values.detach().clone())
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(Blip2VisionModel, "forward", recording)
    return seen


def test_an_exif_rotated_jpeg_is_the_same_tensor_in_training_caption_and_the_service(
    tmp_path: Path, vision_inputs: list[torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rotated.jpg"
    upright = _rotated_jpeg(path)
    with Image.open(path) as raw:
        assert raw.size == (80, 120)  # stored on its side
    assert read_image(path).size == (120, 80)  # read upright

    model, processor, gen, prompt, info = load_for_serving(model="tiny", device="cpu")
    family = family_of(model)
    side = family.image_side(processor)

    # Training: the dataset fit() uses and the family's collator.
    image, caption = CaptionDataset([ManifestRow("r", str(path), "x", "x")], min_size=side)[0]
    assert (
        np.abs(np.asarray(image.resize((120, 80))).astype(int) - upright).mean() < 12
    )  # upright, not turned
    collate = family.collator(processor, model.medcap_config, max_caption_tokens=8)
    train_pixels = collate([(image, caption)])["pixel_values"]

    # medcap caption, as a user runs it.
    gen_args = ["--max-new-tokens", "2", "--device", "cpu"]
    assert main(["caption", str(path), "--model", "tiny", *gen_args]) == 0
    assert "rotated.jpg" in capsys.readouterr().out
    caption_pixels = vision_inputs[-1]

    # The service.
    app = create_app(
        model, processor, gen_defaults=GenerateConfig(max_new_tokens=2), prompt=prompt, info=info
    )
    with TestClient(app) as client:
        response = client.post(
            "/v1/captions", files={"files": ("rotated.jpg", path.read_bytes(), "image/jpeg")}
        )
    assert response.status_code == 200, response.text
    body = response.json()["results"][0]
    assert (body["width"], body["height"]) == (120, 80)
    service_pixels = vision_inputs[-1]

    assert train_pixels.shape == caption_pixels.shape == service_pixels.shape
    assert torch.equal(train_pixels, caption_pixels)
    assert torch.equal(train_pixels, service_pixels)


def test_the_reader_takes_bytes_and_paths_alike(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _rotated_jpeg(path)
    a = np.asarray(read_image(path, min_size=32))
    b = np.asarray(read_image(path.read_bytes(), "rotated.jpg", min_size=32))
    assert np.array_equal(a, b)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert np.array_equal(np.asarray(read_image(buf.getvalue(), "x.png")), a)
