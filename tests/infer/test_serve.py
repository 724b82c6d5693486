"""The caption service with the tiny model: JPEG/PNG/DICOM captions, health and model info, the
bearer token, a volley of malformed requests (each a 4xx JSON answer, then a good request still
works) and real batching of concurrent requests."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medcap.config.generate import GenerateConfig
from medcap.data.images import read_image
from medcap.infer.generate import caption_images
from medcap.infer.serve.app import create_app
from medcap.infer.serve.loading import load_for_serving
from medcap.infer.serve.schemas import BatchSettings, ServeLimits
from medcap.infer.serve.uploads import sanitize_filename

LIMITS = ServeLimits(max_request_bytes=2_000_000, max_images=4, max_pixels=1_000_000, max_new_tokens=24)
DEFAULTS = GenerateConfig(max_new_tokens=8)


def _image_bytes(fmt: str, size=(64, 64), color=(90, 30, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _dicom_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        return f.read()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb is refused from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def served():
    """The tiny model as ``medcap serve --model tiny`` loads it."""
    model, processor, gen, prompt, info = load_for_serving(model="tiny", device="cpu")
    assert info["base"] == "tiny" and info["adapter"] is None
    return model, processor, prompt, info


@pytest.fixture(scope="module")
def client(served):
    model, processor, prompt, info = served
    app = create_app(
        model,
        processor,
        gen_defaults=DEFAULTS,
        prompt=prompt,
        info=info,
        limits=LIMITS,
        batching=BatchSettings(max_batch=8, window_ms=5),
    )
    with TestClient(app) as c:
        yield c


def _direct(served, data: bytes, name: str, gen: GenerateConfig = DEFAULTS) -> str:
    model, processor, prompt, _ = served
    return caption_images(model, processor, [read_image(data, name)], gen, prompt)[0]


@pytest.mark.parametrize("fmt,name", [("JPEG", "scan.jpg"), ("PNG", "scan.png"), ("DICOM", "ct.dcm")])
def test_caption_each_format(client, served, fmt, name):
    data = _dicom_bytes() if fmt == "DICOM" else _image_bytes(fmt)
    r = client.post("/v1/captions", files={"files": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    body = r.json()
    (res,) = body["results"]
    assert res["filename"] == name
    assert res["format"] == fmt.lower()
    assert res["caption"].strip() and res["caption"] == _direct(served, data, name)
    assert res["timings"]["generate_ms"] > 0 and res["timings"]["batch_size"] >= 1
    assert body["options"]["max_new_tokens"] == DEFAULTS.max_new_tokens
    if fmt == "DICOM":
        assert (res["width"], res["height"]) == (128, 128)  # CT_small.dcm


def test_dicom_preview_is_a_png_the_browser_can_show(client):
    r = client.post("/v1/captions", files={"files": ("ct.dcm", _dicom_bytes())}, data={"preview": "true"})
    assert r.status_code == 200, r.text
    preview = r.json()["results"][0]["preview"]
    assert preview.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1])))
    assert im.format == "PNG" and im.size == (128, 128)
    # A CT slice, windowed: not a blank image.
    lo, hi = im.convert("L").getextrema()
    assert hi - lo > 100


def test_several_images_and_options_in_one_request(client, served):
    jpg, png = _image_bytes("JPEG", color=(10, 200, 30)), _image_bytes("PNG", color=(200, 10, 90))
    r = client.post(
        "/v1/captions",
        files=[("files", ("a.jpg", jpg)), ("files", ("b.png", png))],
        data={"num_beams": "2", "max_new_tokens": "6", "repetition_penalty": "1.3"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["filename"] for x in body["results"]] == ["a.jpg", "b.png"]
    gen = GenerateConfig(num_beams=2, max_new_tokens=6, repetition_penalty=1.3)
    assert body["options"]["num_beams"] == 2 and body["options"]["repetition_penalty"] == 1.3
    assert [x["caption"] for x in body["results"]] == [
        _direct(served, jpg, "a.jpg", gen),
        _direct(served, png, "b.png", gen),
    ]


def test_health_model_info_and_openapi(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["auth_required"] is False
    info = client.get("/v1/model").json()
    import medcap

    assert info["base"] == "tiny" and info["medcap_version"] == medcap.__version__
    assert info["generate_defaults"]["max_new_tokens"] == DEFAULTS.max_new_tokens
    assert info["limits"]["max_images"] == LIMITS.max_images
    assert info["batching"]["max_batch"] == 8
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"files", "num_beams", "max_new_tokens"} <= set(body["schema"]["properties"])
    page = client.get("/")
    assert page.status_code == 200 and "medcap" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    # The Swagger page works offline: every script and stylesheet it loads is served by us.
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "cdn." not in docs.text
    for asset in ("/docs-static/swagger-ui-bundle.js", "/docs-static/swagger-ui.css"):
        assert asset in docs.text and client.get(asset).status_code == 200


def test_bearer_token(served):
    model, processor, prompt, info = served
    app = create_app(model, processor, gen_defaults=DEFAULTS, prompt=prompt, info=info, token="s3cret")
    files = {"files": ("a.png", _image_bytes("PNG"))}
    with TestClient(app) as c:
        assert c.get("/healthz").json()["auth_required"] is True  # health needs no token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/captions", files=files, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/model", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/captions", files=files, headers=ok).status_code == 200
        assert c.get("/v1/model", headers=ok).status_code == 200


def _malformed_requests() -> list[tuple[str, dict, int, str]]:
    good = ("a.png", _image_bytes("PNG"), "image/png")
    jpeg = _image_bytes("JPEG", size=(64, 64))

    def oversized_stream():
        # No Content-Length: the limit must hold while the body streams in.
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(30):
            yield b"\0" * 100_000

    return [
        ("no file", {"files": {"num_beams": (None, "1")}}, 400, "no_file"),
        ("empty file", {"files": {"files": ("e.png", b"", "image/png")}}, 400, "empty_file"),
        ("corrupt jpeg", {"files": {"files": ("c.jpg", jpeg[:300], "image/jpeg")}}, 422, "unreadable_image"),
        ("garbage after jpeg magic", {"files": {"files": ("g.jpg", b"\xff\xd8\xff" + b"\x13" * 500)}}, 422, "unreadable_image"),
        ("text file", {"files": {"files": ("notes.txt", b"hello, not an image\n" * 10, "text/plain")}}, 415, "unsupported_format"),
        ("gif", {"files": {"files": ("x.gif", _image_bytes("GIF"))}}, 415, "unsupported_format"),
        ("huge pixel count", {"files": {"files": ("big.png", _image_bytes("PNG", size=(1100, 1000)))}}, 413, "too_many_pixels"),
        ("bomb header", {"files": {"files": ("bomb.png", _png_header_only(100_000, 100_000))}}, 413, "too_many_pixels"),
        ("too many images", {"files": [("files", good)] * 5}, 400, "too_many_images"),
        ("oversized body", {"files": {"files": ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 2_100_000)}}, 413, "request_too_large"),
        ("oversized stream", {"content": oversized_stream(), "headers": {"content-type": "multipart/form-data; boundary=x"}}, 413, "request_too_large"),
        ("num_beams 0", {"files": {"files": good}, "data": {"num_beams": "0"}}, 422, "invalid_option"),
        ("num_beams text", {"files": {"files": good}, "data": {"num_beams": "many"}}, 422, "invalid_option"),
        ("num_beams over cap", {"files": {"files": good}, "data": {"num_beams": "50"}}, 422, "invalid_option"),
        ("max_new_tokens over cap", {"files": {"files": good}, "data": {"max_new_tokens": "25"}}, 422, "invalid_option"),
        ("temperature nan", {"files": {"files": good}, "data": {"temperature": "nan"}}, 422, "invalid_option"),
        ("top_p 2", {"files": {"files": good}, "data": {"top_p": "2"}}, 422, "invalid_option"),
        ("do_sample maybe", {"files": {"files": good}, "data": {"do_sample": "maybe"}}, 422, "invalid_option"),
        ("sampling with beams", {"files": {"files": good}, "data": {"do_sample": "true", "num_beams": "2"}}, 422, "invalid_option"),
        ("min over max", {"files": {"files": good}, "data": {"min_new_tokens": "9", "max_new_tokens": "4"}}, 422, "invalid_option"),
        ("unknown field", {"files": {"files": good}, "data": {"beams": "2"}}, 422, "unknown_field"),
        ("file in wrong field", {"files": {"image": good}}, 422, "unknown_field"),
        ("text in files field", {"files": {"files": (None, "a.png")}}, 400, "not_a_file"),
        ("option given twice", {"files": [("files", good), ("num_beams", (None, "1")), ("num_beams", (None, "2"))]}, 422, "invalid_option"),
        ("json body", {"json": {"files": ["a.png"]}}, 415, "unsupported_media_type"),
        ("broken multipart", {"content": b"--x\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, None),
    ]  # fmt: skip


def test_malformed_volley_then_a_good_request(client, served):
    for name, kwargs, status, code in _malformed_requests():
        r = client.post("/v1/captions", **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        body = r.json()
        assert body["detail"] and body["error"], name
        if code:
            assert body["error"] == code, f"{name}: {body}"
    # Wrong method and unknown path: JSON too.
    r = client.get("/v1/captions")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert client.get("/etc/passwd").json()["error"] == "not_found"
    metrics = client.get("/v1/metrics").json()
    assert "500" not in metrics["errors"]
    # The service still answers, and correctly; a hostile file name is only echoed, sanitised.
    data = _image_bytes("PNG", color=(1, 2, 3))
    r = client.post("/v1/captions", files={"files": ("../../etc/passwd\x00.png", data, "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["filename"].startswith("passwd") and res["filename"].endswith(".png")
    assert "/" not in res["filename"] and "\x00" not in res["filename"]
    assert res["caption"] == _direct(served, data, "x.png")


def test_error_messages_say_what_to_do(client):
    r = client.post("/v1/captions", files={"files": ("big.png", _image_bytes("PNG", size=(1100, 1000)))})
    assert "1100x1000" in r.json()["detail"] and "1,000,000" in r.json()["detail"]
    r = client.post("/v1/captions", files={"files": ("a.png", _image_bytes("PNG"))}, data={"beams": "2"})
    assert "num_beams" in r.json()["detail"]  # lists the known fields
    r = client.post("/v1/captions", files={"files": ("c.jpg", _image_bytes("JPEG")[:300])})
    assert r.json()["field"] == "files[0]" and "c.jpg" in r.json()["detail"]


def test_sanitize_filename():
    assert sanitize_filename("C:\\Users\\x\\scan 1.dcm", 0) == "scan 1.dcm"
    assert sanitize_filename("../../x/<script>.png", 0) == "_script_.png"
    assert sanitize_filename("", 3) == "image3"
    assert sanitize_filename("..", 2) == "image2"
    assert len(sanitize_filename("a" * 500 + ".png", 0)) == 100


def test_concurrent_requests_are_batched_by_options(served):
    """16 concurrent requests, two option sets: fewer model calls than requests, every call holds one
    option set, and each caption equals the one the image gets alone."""
    model, processor, prompt, info = served
    calls: list[tuple[int, int]] = []

    def recording_caption(model_, processor_, images, gen, prompt_):
        calls.append((len(images), gen.num_beams))
        return caption_images(model_, processor_, images, gen, prompt_)

    app = create_app(
        model,
        processor,
        gen_defaults=DEFAULTS,
        prompt=prompt,
        info=info,
        batching=BatchSettings(max_batch=8, window_ms=400),
        caption_fn=recording_caption,
    )
    images = {i: _image_bytes("PNG", color=(15 * i, 255 - 15 * i, 60)) for i in range(16)}
    results: dict[int, dict] = {}
    with TestClient(app) as c:
        barrier = threading.Barrier(16)

        def send(i: int) -> None:
            barrier.wait()
            r = c.post(
                "/v1/captions", files={"files": (f"{i}.png", images[i])}, data={"num_beams": str(1 + i % 2)}
            )
            results[i] = {"status": r.status_code, **r.json()}

        threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        metrics = c.get("/v1/metrics").json()
    assert all(r["status"] == 200 for r in results.values()), results
    assert metrics["images"] == 16 and metrics["max_batch_size"] > 1
    assert metrics["batches"] < 16 and len(calls) == metrics["batches"]
    assert sum(n for n, _ in calls) == 16 and max(n for n, _ in calls) <= 8
    sizes = [r["results"][0]["timings"]["batch_size"] for r in results.values()]
    assert max(sizes) > 1
    for i, r in results.items():
        gen = GenerateConfig(max_new_tokens=DEFAULTS.max_new_tokens, num_beams=1 + i % 2)
        assert r["options"]["num_beams"] == gen.num_beams
        assert r["results"][0]["caption"] == _direct(served, images[i], "x.png", gen), i


def test_batching_off_runs_one_image_per_call(served):
    model, processor, prompt, info = served
    app = create_app(
        model, processor, gen_defaults=DEFAULTS, prompt=prompt, batching=BatchSettings(max_batch=1)
    )
    with TestClient(app) as c:
        threads = [
            threading.Thread(
                target=c.post,
                args=("/v1/captions",),
                kwargs={"files": {"files": ("a.png", _image_bytes("PNG"))}},
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        metrics = c.get("/v1/metrics").json()
    assert metrics["batch_sizes"] == {"1": 4}


def test_cli_argument_errors(capsys):
    from medcap.cli.serve import cmd_serve as cli

    assert cli([]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli(["--checkpoint", "x", "--adapter", "y"]) == 2
    assert cli(["--model", "tiny", "--batch-window-ms", "-1"]) == 2
    assert "window" in capsys.readouterr().err


def test_service_survives_a_model_failure_and_reports_a_dead_worker(served):
    model, processor, prompt, info = served
    failures = {"left": 1}

    def flaky_caption(model_, processor_, images, gen, prompt_):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return caption_images(model_, processor_, images, gen, prompt_)

    app = create_app(model, processor, gen_defaults=DEFAULTS, prompt=prompt, caption_fn=flaky_caption)
    files = {"files": ("a.png", _image_bytes("PNG"))}
    with TestClient(app) as c:
        r = c.post("/v1/captions", files=files)
        assert r.status_code == 500 and r.json()["error"] == "generation_failed"
        assert "out of memory" in r.json()["detail"]
        assert c.post("/v1/captions", files=files).status_code == 200  # the next one works
        # Should the worker ever stop, health says so and requests fail fast instead of hanging.
        c.portal.call(app.state.service.batcher.task.cancel)
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = c.post("/v1/captions", files=files)
        assert r.status_code == 503 and r.json()["error"] == "worker_down"
