"""The caption service under hostile clients: bombs get a fast 4xx (never a 500), decoding is bounded
in memory and concurrency, queued images are model-sized, a client that leaves is a 499 line (not an
error, not decoded or captioned further), sampling options that overflow are refused, and slow or
stalled connections are closed. Live-server tests run uvicorn in a thread on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from medcap.config.generate import GenerateConfig
from medcap.config.loader import ConfigError
from medcap.infer.generate import caption_images
from medcap.infer.serve.app import create_app
from medcap.infer.serve.gate import CHEAP_DECODE_BYTES, DecodeGate
from medcap.infer.serve.loading import load_for_serving
from medcap.infer.serve.schemas import BatchSettings, ServeLimits
from medcap.infer.serve.server import uvicorn_config
from tests.hostile_inputs import (
    blank_png,
    deflated_dicom,
    jpeg_in_dicom,
    progressive_jpeg_scan_bomb,
    rle_colour_dicom,
    run_measured,
)

DEFAULTS = GenerateConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def served():
    model, processor, _gen, prompt, info = load_for_serving(model="tiny", device="cpu")
    return model, processor, prompt, info


class Recorder:
    """A caption function that records the size of every image the model gets; ``hold`` (when set
    up) keeps the first call waiting until released."""

    def __init__(self, hold: bool = False) -> None:
        self.sizes: list[tuple[int, int]] = []
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, model, processor, images, gen, prompt):
        self.calls += 1
        self.sizes.extend(im.size for im in images)
        self.entered.set()
        self.release.wait(30)
        return caption_images(model, processor, images, gen, prompt)


def _app(served, limits: ServeLimits | None = None, caption_fn=None):
    model, processor, prompt, info = served
    return create_app(
        model,
        processor,
        gen_defaults=DEFAULTS,
        prompt=prompt,
        info=info,
        limits=limits or ServeLimits(),
        batching=BatchSettings(max_batch=8, window_ms=5),
        caption_fn=caption_fn,
    )


# ----------------------------------------------------------------------------------------------
# Sampling options (finding 6)


def test_sampling_options_that_overflow_are_refused(served) -> None:
    """temperature 1e-38 or repetition_penalty 1e-39 made inf/NaN probabilities: a 500 before."""
    png = blank_png(64, 64, colour=True)
    with TestClient(_app(served)) as c:
        for field, value in (("temperature", "1e-38"), ("repetition_penalty", "1e-39")):
            r = c.post(
                "/v1/captions", files={"files": ("a.png", png)}, data={"do_sample": "true", field: value}
            )
            assert r.status_code == 422, r.text
            assert r.json()["field"] == field and "greater than or equal to 0.01" in r.json()["detail"]
        r = c.post(
            "/v1/captions",
            files={"files": ("a.png", png)},
            data={"do_sample": "true", "temperature": "0.01", "repetition_penalty": "0.01"},
        )
        assert r.status_code == 200, r.text
        assert "500" not in c.get("/v1/metrics").json()["errors"]
    for bad in ({"temperature": 1e-38}, {"repetition_penalty": 1e-39}, {"temperature": float("inf")}):
        with pytest.raises(ConfigError, match="at least 0.01"):
            GenerateConfig(do_sample=True, **bad)


# ----------------------------------------------------------------------------------------------
# Bombs through the service (findings 1-3, 10)


def test_bombs_get_a_fast_4xx_and_a_good_request_still_works(served) -> None:
    bombs = [
        ("deflated.dcm", deflated_dicom(16_384, 16_384), 413, "too_many_pixels"),  # 256 MiB inflated
        ("rle.dcm", rle_colour_dicom(6000, 6000), 413, "decode_limit"),  # 216 MB of 16-bit RGB
        ("scans.jpg", progressive_jpeg_scan_bomb(1024, 5000), 413, "decode_limit"),
        ("garbage.dcm", jpeg_in_dicom(b"\xff\xd8" + b"junk" * 30, 64, 64), 422, "unreadable_image"),
    ]
    with TestClient(_app(served)) as c:
        for name, data, status, code in bombs:
            t0 = time.perf_counter()
            r = c.post("/v1/captions", files={"files": (name, data)})
            assert (r.status_code, r.json()["error"]) == (status, code), (name, r.text)
            assert " at 0x" not in r.json()["detail"], r.json()["detail"]  # no object reprs
            assert time.perf_counter() - t0 < 3.0, name
        r = c.post("/v1/captions", files={"files": ("ok.png", blank_png(64, 64, colour=True))})
        assert r.status_code == 200, r.text
        errors = c.get("/v1/metrics").json()["errors"]
        assert "500" not in errors and errors == {"413": 3, "422": 1}


def test_queued_images_are_model_sized(served) -> None:
    """A 6000 x 6000 PNG waits in the queue at the model's input size (64 x 64 for the tiny model),
    resized as the processor would; the answer still reports the uploaded size."""
    recorder = Recorder()
    with TestClient(_app(served, caption_fn=recorder)) as c:
        r = c.post(
            "/v1/captions",
            files=[
                ("files", ("big.png", blank_png(6000, 6000))),
                ("files", ("small.png", blank_png(40, 30))),
            ],
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [(x["width"], x["height"]) for x in results] == [(6000, 6000), (40, 30)]
    assert recorder.sizes == [(64, 64), (64, 64)]


def test_many_large_images_decode_in_bounded_memory() -> None:
    """2 requests x 8 copies of a 4000 x 4000 PNG (35 KB each): the old service held every decoded
    image until batched (1,976 MB peak measured here, 459 MB of it the process before the requests);
    now at most two decode at once under the memory budget and the queue holds 64 x 64 copies."""
    code = """
import threading
from fastapi.testclient import TestClient
from medcap.config.generate import GenerateConfig
from medcap.infer.serve.app import create_app
from medcap.infer.serve.loading import load_for_serving
from tests.hostile_inputs import blank_png
model, processor, gen, prompt, info = load_for_serving(model="tiny", device="cpu")
png = blank_png(4000, 4000)
app = create_app(model, processor, gen_defaults=GenerateConfig(max_new_tokens=4))
codes = []
with TestClient(app) as c:
    def one():
        r = c.post("/v1/captions", files=[("files", (f"b{i}.png", png)) for i in range(8)])
        codes.append(r.status_code)
    threads = [threading.Thread(target=one) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    result = [codes, c.get("/v1/metrics").json()["decoding"]["peak_in_flight_bytes"]]
"""
    out = run_measured(code, timeout=300)
    codes, peak_in_flight = out["result"]
    assert codes == [200, 200]
    assert peak_in_flight <= ServeLimits().decode_budget_bytes
    assert out["peak_rss_mb"] < 1000, out  # the old service: 1,976 MB


# ----------------------------------------------------------------------------------------------
# The decode gate


def test_decode_gate_bounds_slots_and_bytes_and_lets_cheap_images_first() -> None:
    """One slot for costly decodes; cheap ones run beside it and before waiting costly ones, as long
    as the bytes in flight stay within the budget; a cancelled waiter never runs."""
    cheap, big = CHEAP_DECODE_BYTES // 2, CHEAP_DECODE_BYTES * 2

    async def scenario() -> tuple[int, int, list[str]]:
        gate = DecodeGate(slots=1, budget=big + cheap + cheap // 2)  # room for one big and one cheap
        running_big, most_big, order = 0, 0, []
        lock = threading.Lock()

        def work(tag: str) -> str:
            nonlocal running_big, most_big
            with lock:
                running_big += tag.startswith("big")
                most_big = max(most_big, running_big)
                order.append(tag)  # the order decodes start in
            time.sleep(0.05)
            with lock:
                running_big -= tag.startswith("big")
            return tag

        tasks = [asyncio.ensure_future(gate.run(big, work, f"big{i}")) for i in range(3)]
        await asyncio.sleep(0.01)  # big0 runs; big1 and big2 wait for the slot
        tasks += [asyncio.ensure_future(gate.run(cheap, work, f"cheap{i}")) for i in range(2)]
        doomed = asyncio.ensure_future(gate.run(big, work, "cancelled"))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0 and gate.active == 0 and gate.waiting == 0
        gate.close()
        return most_big, gate.peak_in_flight, order

    most_big, peak, order = asyncio.run(scenario())
    assert most_big == 1 and peak <= big + cheap + cheap // 2
    # cheap0 runs beside big0 at once; cheap1 must wait for bytes, but goes before big1 and big2
    assert order == ["big0", "cheap0", "cheap1", "big1", "big2"]  # the cancelled one never runs


# ----------------------------------------------------------------------------------------------
# A live server: disconnects, slow headers, stalled bodies (findings 6, 10)


@contextmanager
def live_server(app, limits: ServeLimits) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn_config(
        app,
        "127.0.0.1",
        port,
        header_timeout_s=limits.header_timeout_s,
        keep_alive_s=limits.keep_alive_s,
        log_level="info",
        log_config=None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _multipart(data: bytes, name: str = "a.png") -> tuple[bytes, str]:
    boundary = "medcapBoundary7"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _raw_post(url: str, body: bytes, ctype: str, send: int | None = None) -> socket.socket:
    """Open a connection and send a caption request's headers and the first ``send`` body bytes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/captions HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) if send is None else send])
    return sock


def _wait_for(predicate, seconds: float = 15.0) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_client_that_leaves_is_a_499_line_not_an_error(served, caplog: pytest.LogCaptureFixture) -> None:
    """Mid-upload (the old service logged a 500 with a 115-line traceback and counted it as an error),
    and while queued (the old service still decoded and captioned it): a 499 log line, counted
    apart, and the model never sees the image of a request that has gone."""
    recorder = Recorder(hold=True)
    limits = ServeLimits()
    caplog.set_level(logging.INFO)
    with live_server(_app(served, limits, caption_fn=recorder), limits) as url:
        body, ctype = _multipart(blank_png(64, 64, colour=True))
        sock = _raw_post(url, body, ctype, send=len(body) // 2)
        time.sleep(0.3)
        sock.close()  # gone half way through the upload
        _wait_for(lambda: httpx.get(url + "/v1/metrics").json()["disconnects"] == 1)

        first = threading.Thread(
            target=lambda: httpx.post(
                url + "/v1/captions", files={"files": ("a.png", blank_png(64, 64, colour=True))}, timeout=60
            )
        )
        first.start()
        assert recorder.entered.wait(30)  # the model is busy with the first request
        sock = _raw_post(url, *_multipart(blank_png(80, 80, colour=True), "gone.png"))
        _wait_for(lambda: httpx.get(url + "/v1/metrics").json()["queue_depth"] == 2)
        sock.close()  # gone while its image waits for the model
        _wait_for(lambda: httpx.get(url + "/v1/metrics").json()["disconnects"] == 2)
        recorder.release.set()
        first.join(60)
        metrics = httpx.get(url + "/v1/metrics").json()
    assert metrics["errors"] == {} and metrics["disconnects"] == 2
    assert recorder.calls == 1 and recorder.sizes == [(64, 64)]  # the gone request was never captioned
    lines = [r.getMessage() for r in caplog.records]
    assert sum(" 499 client closed the request" in m for m in lines) == 2, lines
    assert not any(r.levelno >= logging.ERROR or r.exc_info for r in caplog.records), lines


def test_slow_headers_and_stalled_bodies_are_cut_off(served) -> None:
    """A connection that never finishes its headers is closed after header_timeout_s (plain uvicorn
    keeps it open: the control below), also on a kept-alive connection; a body that stalls gets 408."""
    limits = ServeLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=5)
    app = _app(served, limits)
    with live_server(app, limits) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and then nothing
            t0 = time.perf_counter()
            assert sock.recv(100) == b""  # closed by the server
            assert time.perf_counter() - t0 < 3
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):  # the whole JSON answer (headers and body may come apart)
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request on the kept-alive connection
            assert sock.recv(100) == b""
        body, ctype = _multipart(blank_png(64, 64))
        with _raw_post(url, body, ctype, send=10) as sock:
            sock.settimeout(5)
            answer = b""
            while chunk := sock.recv(4096):  # until the server closes ("Connection: close")
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer

    # Control: uvicorn's own h11 protocol leaves a connection with unfinished headers open.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            with pytest.raises(TimeoutError):
                sock.recv(100)  # still open after 2 s
    finally:
        server.should_exit = True
        thread.join(10)
