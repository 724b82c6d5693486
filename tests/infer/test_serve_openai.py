"""The service's OpenAI-compatible API, called with the real ``openai`` client against uvicorn on a
free loopback port (the tiny model): the model list, captions of base64 data URLs (plain and
streamed) equal to what the model gives the image alone, options, errors as the client raises them,
batching shared with the multipart API, and Prometheus ``/metrics`` scraped and parsed."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from medcap.config.generate import GenerateConfig
from medcap.infer.generate import caption_images
from medcap.infer.serve.app import create_app
from medcap.infer.serve.loading import load_for_serving
from medcap.infer.serve.schemas import BatchSettings, ServeLimits
from tests.infer.test_serve import _dicom_bytes, _png_header_only
from tests.infer.test_serve_hostile import live_server

DEFAULTS = GenerateConfig(max_new_tokens=6)
LIMITS = ServeLimits(max_request_bytes=2_000_000, max_pixels=1_000_000, max_new_tokens=24)
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served():
    model, processor, _gen, prompt, info = load_for_serving(model="tiny", device="cpu")
    return model, processor, prompt, info


def _png(color=(90, 30, 160), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _message(*urls: str, text: str = "Describe this radiology image.") -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": content}]


def _direct(served, data: bytes, gen: GenerateConfig = DEFAULTS) -> str:
    """The caption the model gives the image alone, read as the service reads uploads."""
    from medcap.infer.generate import model_image_reader
    from medcap.model.families import family_of

    model, processor, prompt, _ = served
    image = model_image_reader(family_of(model), processor, LIMITS.max_pixels)(data, "x")
    return caption_images(model, processor, [image], gen, prompt)[0]


def _app(served, batching: BatchSettings | None = None, token: str | None = TOKEN):
    model, processor, prompt, info = served
    return create_app(
        model,
        processor,
        gen_defaults=DEFAULTS,
        prompt=prompt,
        info=info,
        limits=LIMITS,
        batching=batching or BatchSettings(max_batch=8, window_ms=5),
        token=token,
    )


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of the service's /metrics, parsed by prometheus-client."""
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_openai_client_lists_the_model_and_captions_data_urls(served):
    png, dicom = _png(), _dicom_bytes()
    with live_server(_app(served), LIMITS) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]

        done = client.chat.completions.create(model="tiny", messages=_message(_data_url(png)))
        assert done.object == "chat.completion" and done.model == "tiny" and len(done.choices) == 1
        choice = done.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == _direct(served, png)
        # Six new tokens of a tiny random model: it never stops early, so the caption hit the limit.
        assert choice.finish_reason == "length"

        # A DICOM file, options (greedy at temperature 0, medcap's num_beams as an extra field).
        beams = GenerateConfig(max_new_tokens=10, num_beams=2)
        done = client.chat.completions.create(
            model="tiny",
            messages=_message(_data_url(dicom, "application/dicom")),
            max_tokens=10,
            temperature=0,
            extra_body={"num_beams": 2},
        )
        assert done.choices[0].message.content == _direct(served, dicom, beams)

        # Streamed: OpenAI's chunk events, which join to the same caption.
        stream = client.chat.completions.create(model="tiny", messages=_message(_data_url(png)), stream=True)
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == _direct(served, png)
        assert (
            chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
        )

        # Sampling is seeded: the same seed gives the same caption.
        sampled = [
            client.chat.completions.create(
                model="tiny", messages=_message(_data_url(png)), temperature=0.9, top_p=0.95, seed=7
            )
            .choices[0]
            .message.content
            for _ in range(2)
        ]
        assert (
            sampled[0]
            == sampled[1]
            == _direct(
                served,
                png,
                GenerateConfig(max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95, seed=7),
            )
        )


def test_openai_errors_are_what_the_client_raises(served):
    png = _png()
    with live_server(_app(served), LIMITS) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)

        def refused(error: type[openai.APIStatusError], **kwargs) -> openai.APIStatusError:
            kwargs.setdefault("model", "tiny")
            kwargs.setdefault("messages", _message(_data_url(png)))
            with pytest.raises(error) as info:
                client.chat.completions.create(**kwargs)
            return info.value

        e = refused(openai.NotFoundError, model="gpt-4o")
        assert "'gpt-4o' is not served here" in e.message and "'tiny'" in e.message and e.param == "model"
        e = refused(openai.BadRequestError, messages=_message("https://example.org/scan.png"))
        assert e.code == "url_not_fetched" and "data URL" in e.message
        assert e.param == "messages[1].content[1].image_url.url"
        e = refused(openai.BadRequestError, messages=_message("data:image/png;base64,@@not base64@@"))
        assert e.code == "invalid_base64"
        e = refused(openai.BadRequestError, messages=_message(_data_url(png), _data_url(png)))
        assert e.code == "too_many_images" and "one request per image" in e.message
        e = refused(openai.BadRequestError, messages=[{"role": "user", "content": "a caption please"}])
        assert e.code == "no_image"
        e = refused(openai.BadRequestError, n=2)
        assert e.param == "n"
        e = refused(openai.BadRequestError, frequency_penalty=0.5)
        assert "repetition_penalty" in e.message
        e = refused(openai.BadRequestError, max_tokens=500)
        assert e.param == "max_tokens" and "at most 24" in e.message
        # The multipart API's limits hold: a decompression bomb is refused from its header (413).
        e = refused(openai.APIStatusError, messages=_message(_data_url(_png_header_only(5000, 5000))))
        assert e.status_code == 413 and e.code == "too_many_pixels" and "5000x5000" in e.message
        assert e.param == "messages[1].content[1].image_url.url"
        e = refused(openai.UnprocessableEntityError, messages=_message(_data_url(png[:60])))
        assert e.code == "unreadable_image"
        # The bearer token guards these routes as it does /v1/captions.
        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        # The multipart API keeps its own error shape.
        r = httpx.post(f"{url}/v1/captions", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        # Nothing above took the service down; the URL alone as image_url (as some clients send it) works.
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": _data_url(png)}]}],
        }
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == _direct(served, png)


def test_openai_and_multipart_requests_share_batches_and_metrics_count_them(served):
    """Concurrent chat completions and multipart uploads with the same options go through the one
    batching worker together; /metrics (scraped, parsed) counts requests, errors by code, batch sizes
    and latencies exactly."""
    images = [_png(color=(20 * i, 200 - 20 * i, 90)) for i in range(6)]
    app = _app(served, BatchSettings(max_batch=8, window_ms=400), token=None)
    captions: dict[int, str] = {}
    with live_server(app, LIMITS) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        barrier = threading.Barrier(len(images))

        def send(i: int) -> None:
            barrier.wait()
            if i % 2:
                r = httpx.post(f"{url}/v1/captions", files={"files": (f"{i}.png", images[i])}, timeout=120)
                assert r.status_code == 200, r.text
                captions[i] = r.json()["results"][0]["caption"]
            else:
                done = client.chat.completions.create(model="tiny", messages=_message(_data_url(images[i])))
                captions[i] = done.choices[0].message.content

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=_message("https://example.org/a.png"))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=_message(_data_url(images[0])))
        counters = httpx.get(f"{url}/v1/metrics").json()
        scraped = _scrape(url)

    assert captions == {i: _direct(served, images[i]) for i in range(len(images))}
    assert counters["batches"] < len(images) and counters["max_batch_size"] > 1

    def value(name: str, **labels: str) -> float:
        return scraped.get((name, tuple(sorted(labels.items()))), 0.0)

    chat, multipart = "/v1/chat/completions", "/v1/captions"
    assert value("medcap_http_requests_total", endpoint=chat, method="POST", code="200") == 3
    assert value("medcap_http_requests_total", endpoint=chat, method="POST", code="400") == 1
    assert value("medcap_http_requests_total", endpoint=chat, method="POST", code="404") == 1
    assert value("medcap_http_requests_total", endpoint=multipart, method="POST", code="200") == 3
    assert value("medcap_http_requests_total", endpoint="/v1/metrics", method="GET", code="200") == 1
    assert value("medcap_errors_total", code="400") == 1 and value("medcap_errors_total", code="404") == 1
    assert value("medcap_caption_requests_total") == 8 and value("medcap_images_total") == 6
    # The latency histogram: every chat completion observed, each within the +Inf bucket.
    assert value("medcap_http_request_duration_seconds_count", endpoint=chat) == 5
    assert value("medcap_http_request_duration_seconds_bucket", endpoint=chat, le="+Inf") == 5
    assert value("medcap_http_request_duration_seconds_sum", endpoint=chat) > 0
    # Batch sizes as a histogram that agrees with the JSON counters.
    assert value("medcap_batches_total") == counters["batches"]
    assert value("medcap_batch_size_count") == counters["batches"]
    assert value("medcap_batch_size_sum") == 6
    assert value("medcap_batch_size_bucket", le="1.0") == counters["batch_sizes"].get("1", 0)
    assert value("medcap_batch_size_bucket", le="8.0") == counters["batches"]
    assert value("medcap_queue_depth") == 0
