"""What the service takes and answers: its limits and batching settings, the caption options, the
response bodies, and the error every refusal is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medcap.config.generate import MIN_REPETITION_PENALTY, MIN_TEMPERATURE, GenerateConfig
from medcap.infer.serve.gate import default_decode_slots


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
    """Images waiting for the model before new requests get 503 (back-pressure). Queued images are
    reduced towards the model's input size first, so the queue never holds full-size images."""
    max_decoded_bytes: int = 160 * 1024 * 1024
    """Largest decoded frame of one image in bytes (width x height x bytes per pixel as decoded,
    read from the header): a 40-megapixel 8-bit colour image fits, a 35 KB PNG that expands to
    gigabytes does not (413)."""
    decode_budget_bytes: int = 1024 * 1024 * 1024
    """Memory all decodes in flight may take together, by each image's estimate from its header;
    further uploads wait for their turn (cheap images first)."""
    max_concurrent_decodes: int = field(default_factory=default_decode_slots)
    """Large images (over 64 MiB by their estimate) decoded at the same time, each in a decoding
    thread; default half the cores. Small images have threads of their own and go first."""
    header_timeout_s: float = 10.0
    """A connection whose request headers are not complete this long after it opened (or after the
    previous response) is closed."""
    body_timeout_s: float = 30.0
    """Longest pause while a request body is being sent before the request gets 408."""
    keep_alive_s: float = 5.0
    """An idle kept-alive connection is closed after this long."""

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_images",
            "max_pixels",
            "max_new_tokens",
            "max_beams",
            "max_queue_images",
            "max_decoded_bytes",
            "decode_budget_bytes",
            "max_concurrent_decodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeLimits.{name} must be positive, got {getattr(self, name)}")


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
        None, ge=MIN_TEMPERATURE, le=10, allow_inf_nan=False, description="sampling temperature"
    )
    repetition_penalty: float | None = Field(
        None,
        ge=MIN_REPETITION_PENALTY,
        le=10,
        allow_inf_nan=False,
        description="penalty for repeated tokens (1 = none)",
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


def error_response(
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


def parse_options(
    fields: dict[str, list[str]], defaults: GenerateConfig, limits: ServeLimits
) -> tuple[GenerateConfig, CaptionOptions]:
    """The decoding settings a request asks for (form fields over ``defaults``), checked against
    ``CaptionOptions``, ``GenerateConfig`` and the service's limits; refusals are 422 naming the field."""
    for name, values in fields.items():
        if len(values) > 1:
            raise ServeError(422, "invalid_option", f"option {name!r} was given {len(values)} times", name)
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
        gen = dataclasses.replace(defaults, **chosen)
    except ValueError as e:  # GenerateConfig's own checks (ConfigError), e.g. sampling with beams
        raise ServeError(422, "invalid_option", str(e)) from None
    if gen.num_beams > limits.max_beams:
        raise ServeError(
            422, "invalid_option", f"num_beams: at most {limits.max_beams} (got {gen.num_beams})", "num_beams"
        )
    if gen.max_new_tokens > limits.max_new_tokens:
        raise ServeError(
            422,
            "invalid_option",
            f"max_new_tokens: at most {limits.max_new_tokens} (got {gen.max_new_tokens})",
            "max_new_tokens",
        )
    return gen, opts
