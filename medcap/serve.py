"""HTTP caption service with a web page (``medcap serve``).

One model, one worker: requests are decoded and checked on the event loop (image decoding in a
thread pool), then queued; a single batching worker gathers queued images for a short window (or
until ``max_batch`` images are waiting), groups them by generation options, and runs
``caption_images`` in one dedicated thread, so the model is never called concurrently and a GPU
captions several images for about the price of one.

Endpoints::

    GET  /                 the web page (medcap/static)
    GET  /healthz          liveness: {"status": "ok", ...}; never needs the token
    GET  /v1/model         base model, adapter, resolved config, defaults, limits, medcap version
    GET  /v1/metrics       request/batch counters (batch-size histogram) for load tests
    POST /v1/captions      multipart: one or more ``files`` + generation options as form fields
    GET  /openapi.json     the OpenAPI schema
    GET  /docs             Swagger UI for the schema, served from the swagger-ui-bundle package

Every user mistake gets a 4xx JSON body ``{"error": CODE, "detail": MESSAGE, "field": NAME}``:
request too large (413), too many images (400), no or empty file (400), unsupported format (415),
undecodable image (422), too many pixels (413), bad or unknown option (422), missing token (401),
queue full (503). Nothing a user sends is used as a file path: uploaded file names are only
echoed back, sanitised.

Example::

    medcap serve --checkpoint runs/demo/run/checkpoints/best --port 8000
    curl -F files=@scan.jpg -F files=@ct.dcm -F num_beams=3 http://127.0.0.1:8000/v1/captions

FastAPI's own /docs page loads Swagger UI's JavaScript from a CDN, which a hospital network or an
offline machine cannot reach; /docs here serves the same Swagger UI from the swagger-ui-bundle
package instead, so the API documentation works offline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import re
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

import medcap
from medcap.generate import GenerateConfig

log = logging.getLogger("medcap.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Image formats the service accepts, recognised by their first bytes (never by the file name).
SUPPORTED_FORMATS = ("jpeg", "png", "tiff", "dicom")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class ServeLimits:
    """What one request may ask of the service; anything beyond gets a clear 4xx answer."""

    max_request_bytes: int = 32 * 1024 * 1024
    """Largest request body in bytes (all files and fields together); more gets 413."""
    max_images: int = 8
    """Most images in one request; more gets 400."""
    max_pixels: int = 40_000_000
    """Largest width x height (x frames for DICOM) of one image, read from its header before
    decoding, so a decompression bomb is refused without being expanded."""
    max_new_tokens: int = 128
    """Upper bound on the ``max_new_tokens`` option."""
    max_beams: int = 8
    """Upper bound on the ``num_beams`` option (memory grows with beams x batch)."""
    max_queue_images: int = 256
    """Images waiting for the model before new requests get 503 (back-pressure)."""

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_images",
            "max_pixels",
            "max_new_tokens",
            "max_beams",
            "max_queue_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class BatchSettings:
    """How the worker gathers concurrent requests into one model call."""

    max_batch: int = 8
    """Most images captioned in one call; 1 turns batching off."""
    window_ms: float = 10.0
    """How long the worker waits for more images after the first one arrives."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.window_ms < 0:
            raise ValueError(f"batch window must be >= 0 ms, got {self.window_ms}")


# --------------------------------------------------------------------------------------------
# Request options and errors
# --------------------------------------------------------------------------------------------


class CaptionOptions(BaseModel):
    """Generation options of ``POST /v1/captions``, sent as multipart form fields.

    Every option left out takes the server's default (``GET /v1/model`` shows them).
    """

    model_config = ConfigDict(extra="forbid")

    num_beams: int | None = Field(None, ge=1, le=64, description="beam search width (1 = greedy)")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="most tokens generated per caption")
    min_new_tokens: int | None = Field(None, ge=0, le=4096, description="fewest tokens generated per caption")
    do_sample: bool | None = Field(None, description="sample instead of greedy/beam decoding")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling mass")
    temperature: float | None = Field(
        None, gt=0, le=10, allow_inf_nan=False, description="sampling temperature"
    )
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, allow_inf_nan=False, description="penalty for repeated tokens (1 = none)"
    )
    no_repeat_ngram_size: int | None = Field(
        None, ge=0, le=16, description="forbid repeating n-grams (0 = off)"
    )
    preview: bool = Field(
        False, description="also return a PNG preview (data URL) of the decoded image, e.g. for DICOM"
    )


GENERATION_FIELDS = [n for n in CaptionOptions.model_fields if n != "preview"]


class ServeError(Exception):
    """A request the service refuses, with the HTTP status and a message the user can act on."""

    def __init__(self, status: int, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field


def _error_response(
    status: int, code: str, detail: str, field: str | None = None, headers=None
) -> JSONResponse:
    return JSONResponse(
        {"error": code, "detail": detail, "field": field}, status_code=status, headers=headers
    )


class ImageTimings(BaseModel):
    """Where the time of one image went."""

    decode_ms: float
    queue_ms: float
    generate_ms: float
    batch_size: int


class ImageResult(BaseModel):
    """One captioned image."""

    index: int
    filename: str
    caption: str
    format: str
    width: int
    height: int
    preview: str | None = None
    timings: ImageTimings


class CaptionResponse(BaseModel):
    """Answer of ``POST /v1/captions``."""

    results: list[ImageResult]
    options: dict[str, Any]
    timings: dict[str, float]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: str
    detail: str
    field: str | None = None


# --------------------------------------------------------------------------------------------
# Helpers: names, formats, pixel counts
# --------------------------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._\- ()+]")


def sanitize_filename(name: str | None, index: int) -> str:
    """A display-only version of an uploaded file name: last path component, safe characters,
    at most 100 characters. It is echoed back and never touches the file system."""
    if not name:
        return f"image{index}"
    base = re.split(r"[\\/]", name)[-1]
    base = _UNSAFE_NAME.sub("_", base).strip(" .")
    return base[:100] or f"image{index}"


def sniff_format(data: bytes) -> str | None:
    """The image format from the file's first bytes (JPEG, PNG, TIFF, DICOM), or None."""
    # DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def header_pixels(
    data: bytes, fmt: str, name: str = "image", field: str | None = None
) -> tuple[int, int, int]:
    """(width, height, frames) from the image header, without decoding the pixels.

    Raises ``ServeError`` 422 when the header cannot be read at all.
    """
    if fmt == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except Exception as e:  # pydicom raises many kinds on damaged files
            raise ServeError(
                422, "unreadable_image", f"{name}: the DICOM header could not be read ({e})", field
            ) from None
        return cols, rows, frames
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice its limit, raises) about huge images; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    frames = 1
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception as e:
        raise ServeError(
            422, "unreadable_image", f"{name}: the {fmt.upper()} header could not be read ({e})", field
        ) from None
    return w, h, frames


def png_data_url(image, max_side: int = 512) -> str:
    """A downscaled PNG of ``image`` as a data URL (browsers cannot show DICOM themselves)."""
    im = image.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# Batching worker
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One image waiting for the model."""

    image: Any
    gen: GenerateConfig
    key: tuple
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class ServeMetrics:
    """Counters the service exposes at /v1/metrics (the batching test and benchmark read them)."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    images: int = 0
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    generate_seconds: float = 0.0

    def as_dict(self, queue_depth: int) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": self.requests,
            "images": self.images,
            "batches": self.batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size": max(self.batch_sizes, default=0),
            "mean_batch_size": round(self.images_in_batches / self.batches, 3) if self.batches else 0.0,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "generate_seconds": round(self.generate_seconds, 4),
            "queue_depth": queue_depth,
        }

    @property
    def images_in_batches(self) -> int:
        return sum(k * v for k, v in self.batch_sizes.items())


CaptionFn = Callable[[Any, Any, list, GenerateConfig, str], list[str]]


class Batcher:
    """Gathers queued images into batches of equal generation options and runs them one at a time.

    ``submit`` is called from request handlers; ``run`` is the single worker task. The model runs
    in a one-thread executor so the event loop keeps answering (health checks, uploads) meanwhile.
    """

    def __init__(
        self,
        caption_fn: Callable[[list, GenerateConfig], list[str]],
        settings: BatchSettings,
        metrics: ServeMetrics,
        max_queue: int,
    ) -> None:
        self.caption_fn = caption_fn
        self.settings = settings
        self.metrics = metrics
        self.max_queue = max_queue
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.pending: deque[_Item] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcap-model")
        self.waiting = 0  # images submitted and not yet finished
        self.task: asyncio.Task | None = None  # the worker, started by the app's lifespan

    @property
    def alive(self) -> bool:
        """True while the worker task runs (a bug that ends it must not leave requests hanging)."""
        return self.task is not None and not self.task.done()

    def submit(self, images: list, gen: GenerateConfig) -> list[asyncio.Future]:
        """Queue images for captioning with ``gen``; raises ServeError 503 when the queue is full."""
        if not self.alive:
            raise ServeError(503, "worker_down", "the model worker is not running; restart the service")
        if self.waiting + len(images) > self.max_queue:
            raise ServeError(
                503,
                "busy",
                f"the service has {self.waiting} images waiting (limit {self.max_queue}); retry shortly",
            )
        loop = asyncio.get_running_loop()
        key = dataclasses.astuple(gen)
        futures = []
        for image in images:
            fut = loop.create_future()
            self.queue.put_nowait(_Item(image=image, gen=gen, key=key, future=fut))
            futures.append(fut)
        self.waiting += len(images)
        return futures

    def fail_waiting(self, _task: asyncio.Task | None = None) -> None:
        """Answer every waiting image with an error once the worker has stopped (never leave a hang)."""
        self._drain()
        for it in self.pending:
            if not it.future.done():
                it.future.set_exception(RuntimeError("the model worker stopped"))
        self.pending.clear()
        self.waiting = 0

    def _drain(self) -> None:
        while True:
            try:
                self.pending.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _count(self, key: tuple) -> int:
        return sum(1 for it in self.pending if it.key == key)

    async def _next_batch(self) -> list[_Item]:
        if not self.pending:
            self.pending.append(await self.queue.get())
        self._drain()
        loop = asyncio.get_running_loop()
        key = self.pending[0].key
        deadline = loop.time() + self.settings.window_ms / 1000.0
        # Wait for more images with the same options, up to the window or a full batch.
        while self.settings.max_batch > 1 and self._count(key) < self.settings.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                self.pending.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
            self._drain()
        batch: list[_Item] = []
        rest: deque[_Item] = deque()
        for it in self.pending:
            if it.key == key and len(batch) < self.settings.max_batch:
                batch.append(it)
            else:
                rest.append(it)
        self.pending = rest
        return batch

    async def run(self) -> None:
        """The worker loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [it for it in batch if not it.future.done()]  # skip requests already gone
            self.waiting -= len(batch) - len(live)
            if not live:
                continue
            started = time.perf_counter()
            try:
                captions = await loop.run_in_executor(
                    self.executor, self.caption_fn, [it.image for it in live], live[0].gen
                )
                if len(captions) != len(live):
                    raise RuntimeError(
                        f"caption function returned {len(captions)} captions for {len(live)} images"
                    )
            except Exception as e:  # a model failure answers these requests with 500, the service lives on
                log.exception("captioning a batch of %d failed", len(live))
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(e)
                self.waiting -= len(live)
                continue
            elapsed = time.perf_counter() - started
            self.metrics.batches += 1
            self.metrics.batch_sizes[len(live)] += 1
            self.metrics.generate_seconds += elapsed
            for it, caption in zip(live, captions, strict=True):
                if not it.future.done():
                    it.future.set_result(
                        {
                            "caption": caption,
                            "queue_ms": (started - it.enqueued) * 1000.0,
                            "generate_ms": elapsed * 1000.0,
                            "batch_size": len(live),
                        }
                    )
            self.waiting -= len(live)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Request body size limit (pure ASGI, so it also covers bodies without Content-Length)
# --------------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """The request body went past ``ServeLimits.max_request_bytes``."""


class BodyLimitMiddleware:
    """Refuses bodies over ``limit`` bytes: at once from Content-Length, or while streaming."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

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
                    response = _error_response(
                        413,
                        "request_too_large",
                        f"the request body is {declared} bytes; the limit is {self.limit}",
                    )
                    return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        return await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _openapi_body() -> dict:
    """The multipart request body of POST /v1/captions for the OpenAPI schema (parsed by hand)."""
    schema = CaptionOptions.model_json_schema()
    props = {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "images"}
    }
    for name, prop in schema["properties"].items():
        props[name] = prop
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": props, "required": ["files"]},
                }
            },
        }
    }


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
) -> FastAPI:
    """Build the caption service around a loaded model.

    ``gen_defaults`` and ``prompt`` are what requests get unless they set options; ``info`` is
    shown at /v1/model (base, adapter, config); ``token`` turns on bearer authentication for /v1/*.
    ``caption_fn`` defaults to ``medcap.generate.caption_images`` and ``read_image_fn`` to
    ``medcap.images.read_image``.
    """
    gen_defaults = gen_defaults or GenerateConfig()
    limits = limits or ServeLimits()
    batching = batching or BatchSettings()
    if caption_fn is None:
        from medcap.generate import caption_images as caption_fn
    if read_image_fn is None:
        import functools

        from medcap.images import read_image

        read_image_fn = functools.partial(read_image, max_pixels=limits.max_pixels)
    from medcap.images import ImageReadError

    metrics = ServeMetrics()

    def run_model(images: list, gen: GenerateConfig) -> list[str]:
        import torch

        # The worker already sized the batch: caption it in one generate() call.
        gen = dataclasses.replace(gen, batch_size=max(gen.batch_size, len(images)))
        with torch.inference_mode():
            return list(caption_fn(model, processor, images, gen, prompt))

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

    app = FastAPI(
        title="medcap caption service",
        version=medcap.__version__,
        description="Radiology image captioning (BLIP-2 + PEFT). POST images to /v1/captions.",
        lifespan=lifespan,
        docs_url=None,  # replaced below by a Swagger UI served from local files
        redoc_url=None,
    )
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.limits = limits
    app.state.batching = batching

    # ---------------- errors: always JSON, never a stack trace ----------------
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        metrics.errors[exc.status] += 1
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        return _error_response(exc.status, exc.code, exc.detail, exc.field, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        metrics.errors[exc.status_code] += 1
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return _error_response(exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.errors[422] += 1
        errs = exc.errors()
        field = ".".join(str(p) for p in errs[0]["loc"]) if errs else None
        return _error_response(422, "invalid_request", "; ".join(e["msg"] for e in errs), field)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        metrics.errors[413] += 1
        return _error_response(
            413,
            "request_too_large",
            f"the request body is over the limit of {limits.max_request_bytes} bytes",
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        metrics.errors[500] += 1
        return _error_response(500, "internal_error", f"the service failed: {type(exc).__name__}: {exc}")

    # ---------------- auth ----------------
    def check_token(request: Request) -> None:
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ServeError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>'")

    # ---------------- routes ----------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon-32x32.png",
        )

    @app.get("/healthz", summary="Liveness check")
    async def healthz():
        alive = batcher.alive
        body = {
            "status": "ok" if alive else "error",
            "detail": None if alive else "the model worker is not running; restart the service",
            "version": medcap.__version__,
            "auth_required": bool(token),
            "queue_depth": batcher.waiting,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_info() -> dict[str, Any]:
        return {
            **(info or {}),
            "medcap_version": medcap.__version__,
            "prompt": prompt,
            "generate_defaults": {
                k: v for k, v in dataclasses.asdict(gen_defaults).items() if k in GENERATION_FIELDS
            },
            "limits": dataclasses.asdict(limits),
            "batching": dataclasses.asdict(batching),
            "formats": list(SUPPORTED_FORMATS),
        }

    @app.get("/v1/model", summary="The served model: base, adapter, config, version")
    async def get_model(request: Request) -> dict[str, Any]:
        check_token(request)
        return model_info()

    @app.get("/v1/metrics", summary="Request and batching counters")
    async def get_metrics(request: Request) -> dict[str, Any]:
        check_token(request)
        return metrics.as_dict(batcher.waiting)

    def parse_options(fields: dict[str, list[str]]) -> tuple[GenerateConfig, CaptionOptions]:
        for name, values in fields.items():
            if len(values) > 1:
                raise ServeError(
                    422, "invalid_option", f"option {name!r} was given {len(values)} times", name
                )
        try:
            opts = CaptionOptions.model_validate({k: v[0] for k, v in fields.items()})
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(p) for p in err["loc"]) or None
            if err["type"] == "extra_forbidden":
                known = ", ".join(["files", *CaptionOptions.model_fields])
                raise ServeError(
                    422, "unknown_field", f"unknown field {name!r}; known fields: {known}", name
                ) from None
            given = repr(err.get("input"))
            given = given if len(given) <= 60 else given[:57] + "..."
            raise ServeError(422, "invalid_option", f"{name}: {err['msg']} (got {given})", name) from None
        chosen = {k: getattr(opts, k) for k in GENERATION_FIELDS if getattr(opts, k) is not None}
        try:
            gen = dataclasses.replace(gen_defaults, **chosen)
        except ValueError as e:  # GenerateConfig's own checks (ConfigError), e.g. sampling with beams
            raise ServeError(422, "invalid_option", str(e)) from None
        if gen.num_beams > limits.max_beams:
            raise ServeError(
                422,
                "invalid_option",
                f"num_beams: at most {limits.max_beams} (got {gen.num_beams})",
                "num_beams",
            )
        if gen.max_new_tokens > limits.max_new_tokens:
            raise ServeError(
                422,
                "invalid_option",
                f"max_new_tokens: at most {limits.max_new_tokens} (got {gen.max_new_tokens})",
                "max_new_tokens",
            )
        return gen, opts

    def decode(data: bytes, name: str, index: int) -> tuple[Any, str]:
        """Check and decode one upload; runs in a worker thread."""
        label = f"files[{index}]"
        if not data:
            raise ServeError(400, "empty_file", f"{name}: the file is empty", label)
        fmt = sniff_format(data)
        if fmt is None:
            raise ServeError(
                415,
                "unsupported_format",
                f"{name}: not a JPEG, PNG, TIFF or DICOM file (the first bytes are not an image signature)",
                label,
            )
        w, h, _frames = header_pixels(data, fmt, name, label)
        # Per frame, as medcap.images decodes only one frame of a multi-frame DICOM.
        if w * h > limits.max_pixels:
            raise ServeError(
                413,
                "too_many_pixels",
                f"{name}: {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,} (downscale it)",
                label,
            )
        try:
            image = read_image_fn(data, name)
        except ImageReadError as e:
            raise ServeError(422, "unreadable_image", f"{name}: {e}", label) from None
        except Exception as e:  # a decoder bug on hostile input is still the file's fault
            raise ServeError(
                422, "unreadable_image", f"{name}: could not decode the {fmt} image: {e}", label
            ) from None
        return image, fmt

    @app.post(
        "/v1/captions",
        summary="Caption one or more images",
        response_model=CaptionResponse,
        responses={s: {"model": ErrorBody} for s in (400, 401, 413, 415, 422, 503)},
        openapi_extra=_openapi_body(),
    )
    async def captions(request: Request):
        t0 = time.perf_counter()
        check_token(request)
        metrics.requests += 1
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
        try:
            uploads: list[tuple[str, UploadFile]] = []
            fields: dict[str, list[str]] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in ("files", "file"):
                        raise ServeError(
                            422, "unknown_field", f"files go in the field 'files', not {key!r}", key
                        )
                    uploads.append((key, value))
                else:
                    if key in ("files", "file"):
                        raise ServeError(
                            400, "not_a_file", f"field {key!r} must be a file upload, not text", key
                        )
                    fields.setdefault(key, []).append(value)
            gen, opts = parse_options(fields)
            if not uploads:
                raise ServeError(
                    400,
                    "no_file",
                    "no image in the request: send one or more files in the field 'files'",
                    "files",
                )
            if len(uploads) > limits.max_images:
                raise ServeError(
                    400,
                    "too_many_images",
                    f"{len(uploads)} images in one request; the limit is {limits.max_images}",
                    "files",
                )
            decoded = []
            for i, (_, up) in enumerate(uploads):
                name = sanitize_filename(up.filename, i)
                data = await up.read()
                t_dec = time.perf_counter()
                image, fmt = await anyio.to_thread.run_sync(decode, data, name, i)
                # The preview (a PNG encode) is made off the event loop too.
                preview = await anyio.to_thread.run_sync(png_data_url, image) if opts.preview else None
                decoded.append((name, image, fmt, preview, (time.perf_counter() - t_dec) * 1000.0))
        finally:
            await form.close()
        t_queued = time.perf_counter()
        futures = batcher.submit([d[1] for d in decoded], gen)
        try:
            outcomes = await asyncio.gather(*futures)
        except Exception as e:  # the worker has logged the traceback
            raise ServeError(
                500, "generation_failed", f"the model failed on this request: {type(e).__name__}: {e}"
            ) from None
        results = []
        for i, ((name, image, fmt, preview, decode_ms), out) in enumerate(
            zip(decoded, outcomes, strict=True)
        ):
            results.append(
                {
                    "index": i,
                    "filename": name,
                    "caption": out["caption"],
                    "format": fmt,
                    "width": image.width,
                    "height": image.height,
                    "preview": preview,
                    "timings": {
                        "decode_ms": round(decode_ms, 3),
                        "queue_ms": round(out["queue_ms"], 3),
                        "generate_ms": round(out["generate_ms"], 3),
                        "batch_size": out["batch_size"],
                    },
                }
            )
        metrics.images += len(results)
        gen_opts = {k: v for k, v in dataclasses.asdict(gen).items() if k in GENERATION_FIELDS}
        t_end = time.perf_counter()
        return {
            "results": results,
            "options": gen_opts,
            "timings": {
                "total_ms": round((t_end - t0) * 1000.0, 3),
                "wait_ms": round((t_end - t_queued) * 1000.0, 3),
            },
        }

    # The body limit wraps everything, so a huge upload is refused before it is read.
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_request_bytes)
    return app


# --------------------------------------------------------------------------------------------
# Loading a model and the command line
# --------------------------------------------------------------------------------------------


def _medcap_config_near(*folders: str | Path | None) -> tuple[dict[str, Any], Path | None]:
    """The run config an export carries (``medcap_config.yaml``, written by ``medcap export``)."""
    import yaml

    for folder in folders:
        path = Path(folder) / "medcap_config.yaml" if folder is not None else None
        if path is not None and path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if isinstance(data, dict):
                return data, path
    return {}, None


def _generate_defaults(run_cfg: dict[str, Any], where: str) -> GenerateConfig:
    from medcap.config import ConfigError, from_dict

    section = dict(run_cfg.get("generate") or {})
    known = {f.name for f in dataclasses.fields(GenerateConfig)}
    dropped = sorted(set(section) - known)
    if dropped:
        log.warning(
            "%s: generate settings this version does not know, ignored: %s", where, ", ".join(dropped)
        )
    try:
        return from_dict(GenerateConfig, {k: v for k, v in section.items() if k in known})
    except ConfigError as e:
        raise ValueError(f"{where}: generate: {e}") from None


def load_for_serving(
    model: str | None = None,
    checkpoint: str | Path | None = None,
    adapter: str | Path | None = None,
    device: str | None = None,
) -> tuple[Any, Any, GenerateConfig, str, dict[str, Any]]:
    """Load what ``medcap serve`` serves: ``(model, processor, gen_defaults, prompt, info)``.

    * ``checkpoint``: a training checkpoint or run folder (base + adapter + trained weights);
    * ``model``: a hub id, ``tiny``, or a folder (a merged export), with an optional PEFT
      ``adapter`` folder (an unmerged export) put on it. With only ``adapter``, the base is the one
      its adapter_config.json names; ``base`` (an export's own base folder) is found next to it.

    Loading is ``medcap.generate.load_captioner``; for exports, the prompt and decoding defaults
    come from the ``medcap_config.yaml`` that ``medcap export`` writes.
    """

    from medcap.generate import load_captioner

    if checkpoint is not None:
        cap = load_captioner(checkpoint=checkpoint, device=device, verbose=True)
        return cap.model, cap.processor, cap.gen, cap.prompt, {**cap.info, "config": cap.run_cfg}
    run_cfg, cfg_path = _medcap_config_near(adapter, model if model and Path(model).is_dir() else None)
    prompt = (run_cfg.get("model") or {}).get("prompt", "") or ""
    cap = load_captioner(model=model, adapter=adapter, device=device, prompt=prompt, verbose=True)
    gen = _generate_defaults(run_cfg, str(cfg_path)) if cfg_path else cap.gen
    return cap.model, cap.processor, gen, prompt, {**cap.info, "config": run_cfg or None}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcap serve",
        description="Serve captions over HTTP (POST /v1/captions) with a web page at /.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="base model: hub id, local folder (e.g. a merged export) or 'tiny'")
    src.add_argument("--checkpoint", help="training checkpoint or run folder (RUN/checkpoints/best)")
    p.add_argument(
        "--adapter",
        help="PEFT adapter folder (an unmerged export) put on --model, or on the base its config names",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-batch", type=_positive_int, default=8, help="most images per model call (1 = no batching)"
    )
    p.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="how long to gather requests into a batch"
    )
    p.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' on /v1/* (or MEDCAP_TOKEN)"
    )
    d = ServeLimits()
    p.add_argument(
        "--max-request-mb", type=float, default=d.max_request_bytes / 2**20, help="largest request body"
    )
    p.add_argument("--max-images", type=_positive_int, default=d.max_images, help="most images per request")
    p.add_argument(
        "--max-pixels", type=_positive_int, default=d.max_pixels, help="largest image (width x height)"
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=d.max_new_tokens, help="cap on max_new_tokens"
    )
    p.add_argument("--max-beams", type=_positive_int, default=d.max_beams, help="cap on num_beams")
    p.add_argument(
        "--max-queue", type=_positive_int, default=d.max_queue_images, help="images waiting before 503"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def cli(argv: list[str]) -> int:
    """``medcap serve``: load the model and run the service on uvicorn until interrupted."""
    import os

    import uvicorn

    args = build_parser().parse_args(argv)
    if not (args.model or args.checkpoint or args.adapter):
        print("medcap serve: give --model NAME_OR_PATH, --checkpoint DIR or --adapter DIR", file=sys.stderr)
        return 2
    if args.checkpoint and args.adapter:
        print(
            "medcap serve: --adapter goes with --model (a checkpoint brings its own adapter)", file=sys.stderr
        )
        return 2
    token = args.token or os.environ.get("MEDCAP_TOKEN") or None
    try:
        limits = ServeLimits(
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_images=args.max_images,
            max_pixels=args.max_pixels,
            max_new_tokens=args.max_new_tokens,
            max_beams=args.max_beams,
            max_queue_images=args.max_queue,
        )
        batching = BatchSettings(max_batch=args.max_batch, window_ms=args.batch_window_ms)
    except ValueError as e:
        print(f"medcap serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        model, processor, gen, prompt, info = load_for_serving(
            model=args.model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"medcap serve: {e}", file=sys.stderr)
        return 2
    app = create_app(
        model,
        processor,
        gen_defaults=gen,
        prompt=prompt,
        info=info,
        limits=limits,
        batching=batching,
        token=token,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning(
            "listening on %s without --token: anyone who can reach this port can use the model", args.host
        )
    print(
        f"medcap serve: http://{args.host}:{args.port}/  (API docs: /docs, schema: /openapi.json)", flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
