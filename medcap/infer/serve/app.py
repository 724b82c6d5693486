"""The FastAPI app of ``medcap serve``: ``create_app`` wires a loaded model to the routes below.

Everything a request needs is one ``Service`` object on ``app.state.service``; the route handlers
and error handlers are plain module functions that read it, so each can be read on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

import medcap
from medcap.config.generate import GenerateConfig
from medcap.data.images import SUPPORTED_FORMATS, plain_message
from medcap.infer.serve.batcher import Batcher, CaptionFn, ServeMetrics
from medcap.infer.serve.gate import DecodeGate
from medcap.infer.serve.openai_api import (
    OPENAI_PATHS,
    chat_completions,
    list_models,
    openai_error,
    served_model_id,
)
from medcap.infer.serve.prometheus import HttpMetricsMiddleware, ServiceCollector, prometheus_metrics
from medcap.infer.serve.schemas import (
    GENERATION_FIELDS,
    BatchSettings,
    CaptionOptions,
    CaptionResponse,
    ErrorBody,
    ServeError,
    ServeLimits,
    error_response,
    parse_options,
)
from medcap.infer.serve.uploads import (
    DecodedUpload,
    check_upload,
    decode_upload,
    reduce_for_queue,
    sanitize_filename,
)

log = logging.getLogger("medcap.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class Service:
    """What the routes share: the model's settings, the limits, the worker and its counters."""

    gen_defaults: GenerateConfig
    prompt: str
    info: dict[str, Any]
    limits: ServeLimits
    batching: BatchSettings
    token: str | None
    batcher: Batcher
    metrics: ServeMetrics
    read: Callable[[bytes, str], Any]
    shrink: Callable[[Any], Any]
    """Takes a decoded image to the size it waits in the queue at (the model's input size)."""
    gate: DecodeGate
    model_id: str
    """The id ``GET /v1/models`` lists and chat completions must name."""
    count_tokens: Callable[[str], int]
    """Tokens of a caption (for a chat completion's finish_reason)."""


def _service(request: Request) -> Service:
    return request.app.state.service


# --------------------------------------------------------------------------------------------
# Request body size limit (pure ASGI, so it also covers bodies without Content-Length)
# --------------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """The request body went past ``ServeLimits.max_request_bytes``."""


class BodyTimeout(Exception):
    """The client stopped sending the request body for longer than ``ServeLimits.body_timeout_s``."""


class BodyLimitMiddleware:
    """Refuses bodies over ``limit`` bytes (at once from Content-Length, or while streaming) and
    bodies that stall for more than ``idle_timeout_s`` between two chunks (408)."""

    def __init__(self, app, limit: int, idle_timeout_s: float = 30.0) -> None:
        self.app, self.limit, self.idle_timeout_s = app, limit, idle_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    response = answer_error(
                        scope.get("path", ""),
                        413,
                        "request_too_large",
                        f"the request body is {declared} bytes; the limit is {self.limit}",
                    )
                    return await response(scope, receive, send)
        seen = 0
        body_done = False

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # later calls only wait for the client to go away: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except asyncio.TimeoutError:  # not an alias of TimeoutError before Python 3.11
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
                body_done = not message.get("more_body", False)
            return message

        return await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------------------------
# Errors: always JSON, never a stack trace
# --------------------------------------------------------------------------------------------


def answer_error(
    path: str, status: int, code: str, detail: str, field: str | None = None, headers=None
) -> JSONResponse:
    """An error answer in the shape of the API the path belongs to: OpenAI's on its routes, else
    ``{"error": CODE, "detail": MESSAGE, "field": NAME}``."""
    if path in OPENAI_PATHS:
        return openai_error(status, code, detail, field, headers)
    return error_response(status, code, detail, field, headers)


async def on_serve_error(request: Request, exc: ServeError) -> JSONResponse:
    _service(request).metrics.errors[exc.status] += 1
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 503:
        headers = {"Retry-After": "1"}
    return answer_error(request.url.path, exc.status, exc.code, exc.detail, exc.field, headers)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    _service(request).metrics.errors[exc.status_code] += 1
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    return answer_error(
        request.url.path, exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None)
    )


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _service(request).metrics.errors[422] += 1
    errs = exc.errors()
    field = ".".join(str(p) for p in errs[0]["loc"]) if errs else None
    return answer_error(request.url.path, 422, "invalid_request", "; ".join(e["msg"] for e in errs), field)


async def on_body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    service = _service(request)
    service.metrics.errors[413] += 1
    return answer_error(
        request.url.path,
        413,
        "request_too_large",
        f"the request body is over the limit of {service.limits.max_request_bytes} bytes",
    )


async def on_body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
    service = _service(request)
    service.metrics.errors[408] += 1
    return answer_error(
        request.url.path,
        408,
        "request_timeout",
        f"the request body stalled for more than {service.limits.body_timeout_s:g} s; send it again",
        headers={"Connection": "close"},
    )


async def on_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    _service(request).metrics.errors[500] += 1
    return answer_error(
        request.url.path,
        500,
        "internal_error",
        f"the service failed: {type(exc).__name__}: {plain_message(exc)}",
    )


def client_gone(request: Request, started: float, when: str) -> Response:
    """A client that closed its connection: a 499-style log line (nginx's "client closed request"),
    not an error of the service; nobody reads the answer."""
    service = _service(request)
    service.metrics.disconnects += 1
    client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    log.info(
        '%s - "%s %s" 499 client closed the request %s (after %.0f ms)',
        client,
        request.method,
        request.url.path,
        when,
        (time.perf_counter() - started) * 1000.0,
    )
    return Response(status_code=499)


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has gone (call after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_client_leaves(request: Request, work: Any) -> tuple[bool, Any]:
    """Run the coroutine ``work`` while watching the connection: ``(True, its result)``, or
    ``(False, None)`` once the client has gone (the work is cancelled: decodes not yet started are
    skipped, queued images are dropped before the model sees them)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the server is shutting down
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task in done:
        return True, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False, None


def check_token(request: Request) -> None:
    """Bearer authentication for /v1/* when the service has a token."""
    token = _service(request).token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ServeError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>'")


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------


async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


async def healthz(request: Request) -> JSONResponse:
    """Liveness check."""
    service = _service(request)
    alive = service.batcher.alive
    body = {
        "status": "ok" if alive else "error",
        "detail": None if alive else "the model worker is not running; restart the service",
        "version": medcap.__version__,
        "auth_required": bool(service.token),
        "queue_depth": service.batcher.waiting,
    }
    return JSONResponse(body, status_code=200 if alive else 503)


async def get_model(request: Request) -> dict[str, Any]:
    """The served model: base, adapter, config, version."""
    check_token(request)
    s = _service(request)
    return {
        **s.info,
        "medcap_version": medcap.__version__,
        "prompt": s.prompt,
        "generate_defaults": {
            k: v for k, v in dataclasses.asdict(s.gen_defaults).items() if k in GENERATION_FIELDS
        },
        "limits": dataclasses.asdict(s.limits),
        "batching": dataclasses.asdict(s.batching),
        "formats": list(SUPPORTED_FORMATS),
    }


async def get_metrics(request: Request) -> dict[str, Any]:
    """Request and batching counters."""
    check_token(request)
    s = _service(request)
    return {**s.metrics.as_dict(s.batcher.waiting), "decoding": s.gate.as_dict()}


async def _read_form(
    request: Request, limits: ServeLimits
) -> tuple[list[UploadFile], dict[str, list[str]], Any]:
    """The multipart form: uploads in ``files``, options as text fields (anything else refused)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ServeError(
            415,
            "unsupported_media_type",
            "send the images as multipart/form-data (field 'files'), e.g. curl -F files=@image.jpg URL",
        )
    # Limits on the multipart parser bound memory even before our own checks.
    form = await request.form(
        max_files=limits.max_images + 1,
        max_fields=len(CaptionOptions.model_fields) * 2 + 8,
        max_part_size=64 * 1024,
    )
    uploads: list[UploadFile] = []
    fields: dict[str, list[str]] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in ("files", "file"):
                    raise ServeError(422, "unknown_field", f"files go in the field 'files', not {key!r}", key)
                uploads.append(value)
            else:
                if key in ("files", "file"):
                    raise ServeError(400, "not_a_file", f"field {key!r} must be a file upload, not text", key)
                fields.setdefault(key, []).append(value)
    except BaseException:
        await form.close()
        raise
    return uploads, fields, form


async def captions(request: Request) -> Any:
    """Caption one or more images (``POST /v1/captions``, multipart).

    The images are decoded and captioned in a task of their own while this handler watches the
    connection: a client that goes away stops the work (decodes not yet started are skipped, queued
    images are dropped before the model sees them) and is logged as a 499, not as an error.
    """
    t0 = time.perf_counter()
    check_token(request)
    s = _service(request)
    s.metrics.requests += 1
    try:
        uploads, fields, form = await _read_form(request, s.limits)
    except ClientDisconnect:
        return client_gone(request, t0, "while sending it")
    try:
        gen, opts = parse_options(fields, s.gen_defaults, s.limits)
        if not uploads:
            raise ServeError(
                400,
                "no_file",
                "no image in the request: send one or more files in the field 'files'",
                "files",
            )
        if len(uploads) > s.limits.max_images:
            raise ServeError(
                400,
                "too_many_images",
                f"{len(uploads)} images in one request; the limit is {s.limits.max_images}",
                "files",
            )
        finished, answer = await run_unless_client_leaves(
            request, _caption_uploads(s, uploads, gen, opts.preview, t0)
        )
        if finished:
            return answer
        return client_gone(request, t0, "while its images were decoded or captioned")
    finally:
        await form.close()


async def _caption_uploads(
    s: Service, uploads: list[UploadFile], gen: GenerateConfig, preview: bool, t0: float
) -> dict[str, Any]:
    """Check, decode (through the decode gate) and caption the uploads of one request."""
    decoded: list[DecodedUpload] = []
    for i, up in enumerate(uploads):
        name = sanitize_filename(up.filename, i)
        data = await up.read()
        header = await anyio.to_thread.run_sync(check_upload, data, name, i, s.limits)
        decoded.append(
            await s.gate.run(
                header.decode_peak_bytes, decode_upload, data, name, i, header, s.read, s.shrink, preview
            )
        )
    t_queued = time.perf_counter()
    futures = s.batcher.submit([d.image for d in decoded], gen)
    try:
        outcomes = await asyncio.gather(*futures)
    except Exception as e:  # the worker has logged the traceback
        raise ServeError(
            500,
            "generation_failed",
            f"the model failed on this request: {type(e).__name__}: {plain_message(e)}",
        ) from None
    results = []
    for i, (d, out) in enumerate(zip(decoded, outcomes, strict=True)):
        results.append(
            {
                "index": i,
                "filename": d.name,
                "caption": out["caption"],
                "format": d.format,
                "width": d.width,
                "height": d.height,
                "preview": d.preview,
                "timings": {
                    "decode_ms": round(d.decode_ms, 3),
                    "queue_ms": round(out["queue_ms"], 3),
                    "generate_ms": round(out["generate_ms"], 3),
                    "batch_size": out["batch_size"],
                },
            }
        )
    s.metrics.images += len(results)
    t_end = time.perf_counter()
    return {
        "results": results,
        "options": {k: v for k, v in dataclasses.asdict(gen).items() if k in GENERATION_FIELDS},
        "timings": {
            "total_ms": round((t_end - t0) * 1000.0, 3),
            "wait_ms": round((t_end - t_queued) * 1000.0, 3),
        },
    }


def _openapi_body() -> dict:
    """The multipart request body of POST /v1/captions for the OpenAPI schema (parsed by hand)."""
    schema = CaptionOptions.model_json_schema()
    props = {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "images"}
    }
    props.update(schema["properties"])
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": props, "required": ["files"]}
                }
            },
        }
    }


async def docs(request: Request) -> Any:
    """Swagger UI from the swagger-ui-bundle package's files (mounted at /docs-static): FastAPI's own
    page loads it from a CDN, which an offline or hospital network cannot reach."""
    from fastapi.openapi.docs import get_swagger_ui_html

    app = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - API docs",
        swagger_js_url="/docs-static/swagger-ui-bundle.js",
        swagger_css_url="/docs-static/swagger-ui.css",
        swagger_favicon_url="/docs-static/favicon-32x32.png",
    )


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def create_app(
    model: Any,
    processor: Any,
    *,
    gen_defaults: GenerateConfig | None = None,
    prompt: str = "",
    info: dict[str, Any] | None = None,
    limits: ServeLimits | None = None,
    batching: BatchSettings | None = None,
    token: str | None = None,
    caption_fn: CaptionFn | None = None,
    read_image_fn: Callable[[bytes, str], Any] | None = None,
    model_id: str | None = None,
) -> FastAPI:
    """Build the caption service around a loaded model.

    ``gen_defaults`` and ``prompt`` are what requests get unless they set options; ``info`` is
    shown at /v1/model (base, adapter, config); ``token`` turns on bearer authentication for /v1/*.
    ``caption_fn`` defaults to ``medcap.infer.generate.caption_images``; ``read_image_fn`` to the
    one image reader, decoding as training did (draft mode at the model's input side).
    ``model_id``: the id of the OpenAI-compatible API (default: ``served_model_id(info)``).
    """
    gen_defaults = gen_defaults or GenerateConfig()
    limits = limits or ServeLimits()
    batching = batching or BatchSettings()
    if caption_fn is None:
        from medcap.infer.generate import caption_images as caption_fn
    from medcap.infer.generate import model_image_reader
    from medcap.model.families import family_of
    from medcap.model.family import processor_resizer

    family = family_of(model)
    side = family.image_side(processor)
    if read_image_fn is None:
        # Images beyond the reader's or the family's limits are refused per upload (422, the
        # limit named).
        read_image_fn = model_image_reader(
            family, processor, limits.max_pixels, max_decoded_bytes=limits.max_decoded_bytes
        )
    # Queued images wait at the model's input size: resized exactly as the processor would (then its
    # own resize is a no-op), else box-reduced towards it.
    shrink = processor_resizer(processor) or functools.partial(reduce_for_queue, model_side=side)
    gate = DecodeGate(limits.max_concurrent_decodes, limits.decode_budget_bytes)

    def run_model(images: list, gen: GenerateConfig) -> list[str]:
        import torch

        # The worker already sized the batch: caption it in one generate() call.
        gen = dataclasses.replace(gen, batch_size=max(gen.batch_size, len(images)))
        with torch.inference_mode():
            return list(caption_fn(model, processor, images, gen, prompt))

    metrics = ServeMetrics()
    batcher = Batcher(run_model, batching, metrics, limits.max_queue_images)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run(), name="medcap-batcher")
        batcher.task = task
        task.add_done_callback(batcher.fail_waiting)
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
            batcher.close()
            gate.close()

    app = FastAPI(
        title="medcap caption service",
        version=medcap.__version__,
        description="Radiology image captioning. POST images to /v1/captions.",
        lifespan=lifespan,
        docs_url=None,  # replaced by a Swagger UI served from local files (_mount_docs)
        redoc_url=None,
    )
    app.state.service = Service(
        gen_defaults=gen_defaults,
        prompt=prompt,
        info=dict(info or {}),
        limits=limits,
        batching=batching,
        token=token,
        batcher=batcher,
        metrics=metrics,
        read=read_image_fn,
        shrink=shrink,
        gate=gate,
        model_id=model_id or served_model_id(dict(info or {})),
        count_tokens=_token_counter(processor),
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServiceCollector(metrics, lambda: batcher.waiting, gate.as_dict))
    app.state.prometheus = registry

    app.add_exception_handler(ServeError, on_serve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(BodyTooLarge, on_body_too_large)
    app.add_exception_handler(BodyTimeout, on_body_timeout)
    app.add_exception_handler(Exception, on_internal_error)

    app.add_api_route("/", index, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    import swagger_ui_bundle

    app.mount("/docs-static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static")
    app.add_api_route("/docs", docs, include_in_schema=False)
    app.add_api_route("/healthz", healthz, summary="Liveness check")
    app.add_api_route("/v1/model", get_model, summary="The served model: base, adapter, config, version")
    app.add_api_route("/v1/metrics", get_metrics, summary="Request and batching counters")
    app.add_api_route("/metrics", prometheus_metrics, summary="Prometheus metrics", include_in_schema=True)
    app.add_api_route("/v1/models", list_models, summary="OpenAI-compatible: the served model")
    app.add_api_route(
        "/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        summary="OpenAI-compatible: the caption of one image sent as a base64 data URL",
    )
    app.add_api_route(
        "/v1/captions",
        captions,
        methods=["POST"],
        summary="Caption one or more images",
        response_model=CaptionResponse,
        responses={s: {"model": ErrorBody} for s in (400, 401, 408, 413, 415, 422, 503)},
        openapi_extra=_openapi_body(),
    )
    # The body limit wraps everything, so a huge upload is refused before it is read.
    app.add_middleware(
        BodyLimitMiddleware, limit=limits.max_request_bytes, idle_timeout_s=limits.body_timeout_s
    )
    # Outermost: every request is counted and timed, refusals by the body limit included.
    app.add_middleware(HttpMetricsMiddleware, registry=registry)
    return app


def _token_counter(processor: Any) -> Callable[[str], int]:
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__ = ["BodyLimitMiddleware", "Service", "create_app"]
