"""The OpenAI-compatible routes of ``medcap serve``: ``GET /v1/models`` and ``POST /v1/chat/completions``
(what the ``openai`` client, LangChain, vLLM's users and the like call).

A chat completion here is the caption of one image: the request's user message carries it as an
``image_url`` part whose URL is a base64 ``data:`` URL (the service fetches no URLs: a hospital
network should not let it). The caption follows the prompt the model was trained with; text parts
of the messages are accepted (clients send "Describe this image.") but do not steer the model, which
was fine-tuned on one fixed prompt. The image goes through exactly what ``POST /v1/captions`` uploads
go through: the header checks and limits (``check_upload``), the decode gate, the batching worker
(so OpenAI-style and multipart requests with the same options share batches) and the bearer token.

Options: ``max_tokens`` / ``max_completion_tokens`` (max_new_tokens), ``temperature`` (0: greedy;
above 0: sampling at that temperature), ``top_p`` (sampling), ``seed``, and medcap's own decoding
options (``num_beams``, ``min_new_tokens``, ``repetition_penalty``, ``no_repeat_ngram_size``) as
extra body fields; every bound of the multipart API applies. ``n`` above 1, ``stop``, tools,
logprobs and non-zero frequency or presence penalties are refused with 400 naming the field rather
than silently ignored. ``stream: true`` answers with server-sent events (the OpenAI chunk format):
the caption arrives as one content chunk once its batch has been generated (the batching worker
captions whole batches; tokens are not streamed one by one).

Errors on these routes have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so
clients raise their usual exceptions (``openai.BadRequestError`` ...) with medcap's message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medcap.config.generate import GenerateConfig
from medcap.infer.serve.schemas import ServeError, parse_options
from medcap.infer.serve.uploads import check_upload, decode_upload

#: The routes that answer errors in OpenAI's shape.
OPENAI_PATHS = ("/v1/models", "/v1/chat/completions")

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


def served_model_id(info: dict[str, Any]) -> str:
    """The model id ``/v1/models`` lists: the run's folder for a checkpoint, the adapter's folder
    for an adapter, else the base (a hub id, ``tiny`` or a merged export's folder name)."""
    if info.get("checkpoint"):
        ckpt = Path(str(info["checkpoint"]))
        # RUN/checkpoints/best -> RUN
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
        return f"medcap/{run.name}"
    if info.get("adapter"):
        return f"medcap/{Path(str(info['adapter'])).name}"
    base = str(info.get("base") or "medcap")
    return Path(base).name if Path(base).is_dir() else base


def openai_error(
    status: int, code: str, detail: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error body as OpenAI's API writes it."""
    kind = {
        401: "authentication_error",
        404: "not_found_error",
        408: "timeout_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "service_unavailable",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": detail, "type": kind, "param": field, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    """One part of a message's content: text or an image."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | str | None = None
    """``{"url": ...}`` as OpenAI sends it, or the URL alone (as some clients write it)."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """The fields of ``POST /v1/chat/completions`` the service reads; other OpenAI fields that do not
    change the caption (``user``, ``metadata``, ``store`` ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=10, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    n: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    # medcap's own decoding options (the openai client sends them with extra_body=...).
    num_beams: int | None = None
    min_new_tokens: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    """Fields that would change the answer in a way the service cannot honour: refused, not ignored."""
    if req.n not in (None, 1):
        raise ServeError(400, "unsupported_option", f"n={req.n}: one caption per request (n=1)", "n")
    if req.stop:
        raise ServeError(400, "unsupported_option", "stop sequences are not supported", "stop")
    if req.tools:
        raise ServeError(400, "unsupported_option", "a caption model takes no tools", "tools")
    if req.logprobs:
        raise ServeError(400, "unsupported_option", "logprobs are not returned", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise ServeError(
                400,
                "unsupported_option",
                f"{name} is not supported; use repetition_penalty or no_repeat_ngram_size",
                name,
            )
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise ServeError(
            400, "invalid_option", "max_tokens and max_completion_tokens disagree; give one", "max_tokens"
        )


def generation_of(req: ChatCompletionRequest, defaults: GenerateConfig, limits: Any) -> GenerateConfig:
    """The decoding settings of a chat completion, checked by the multipart API's own rules."""
    fields: dict[str, Any] = {}
    max_new = req.max_completion_tokens or req.max_tokens
    if max_new is not None:
        fields["max_new_tokens"] = max_new
    if req.temperature is not None:
        if req.temperature == 0:
            fields["do_sample"] = False
        else:
            fields.update(do_sample=True, temperature=req.temperature, num_beams=1)
    if req.top_p is not None:
        fields.update(do_sample=True, top_p=req.top_p, num_beams=1)
    for name in ("num_beams", "min_new_tokens", "repetition_penalty", "no_repeat_ngram_size"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        gen, _ = parse_options({k: [json.dumps(v)] for k, v in fields.items()}, defaults, limits)
    except ServeError as e:
        if e.field == "max_new_tokens":
            e.field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ServeError(400, e.code, e.detail, e.field) from None
    if req.seed is not None:
        gen = dataclasses.replace(gen, seed=req.seed)
    return gen


def image_of(req: ChatCompletionRequest) -> tuple[bytes, str, str]:
    """``(bytes, display name, field)`` of the request's one image (a base64 data URL)."""
    found: list[tuple[str, str]] = []
    for i, message in enumerate(req.messages):
        if message.role != "user" or not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type == "image_url":
                if part.image_url is None:
                    raise ServeError(
                        400,
                        "invalid_request",
                        "an image_url part needs {'url': ...}",
                        f"messages[{i}].content[{j}]",
                    )
                if isinstance(part.image_url, str):
                    found.append((part.image_url, f"messages[{i}].content[{j}].image_url"))
                else:
                    found.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
    if not found:
        raise ServeError(
            400,
            "no_image",
            "no image in the request: put one in a user message as "
            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}',
            "messages",
        )
    if len(found) > 1:
        raise ServeError(
            400,
            "too_many_images",
            f"{len(found)} images in one chat completion; one caption per request: send one request per "
            "image (concurrent requests are batched)",
            found[1][1],
        )
    url, field = found[0]
    match = _DATA_URL.match(url)
    if url.startswith(("http://", "https://")):
        raise ServeError(
            400,
            "url_not_fetched",
            "the service fetches no URLs; send the image itself as a data URL "
            "(data:image/png;base64,... with the file's bytes in base64)",
            field,
        )
    if match is None or not match.group("b64"):
        raise ServeError(
            400,
            "invalid_image_url",
            "image_url.url must be a base64 data URL: data:image/png;base64,...",
            field,
        )
    payload = url[match.end() :]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(
            400,
            "invalid_base64",
            "the data URL's payload is not valid base64 (no spaces or line breaks)",
            field,
        ) from None
    mime = match.group("mime") or "image"
    return data, f"image.{mime.rsplit('/', 1)[-1]}", field


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------


async def list_models(request: Request) -> dict[str, Any]:
    """``GET /v1/models``: the one served model."""
    from medcap.infer.serve.app import _service, check_token

    check_token(request)
    s = _service(request)
    return {
        "object": "list",
        "data": [
            {"id": s.model_id, "object": "model", "created": int(s.metrics.started), "owned_by": "medcap"}
        ],
    }


async def _read_request(request: Request) -> ChatCompletionRequest:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("application/json"):
        raise ServeError(415, "unsupported_media_type", "send the chat completion as application/json")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(400, "invalid_json", f"the body is not JSON: {e}") from None
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise ServeError(400, "invalid_request", f"{field}: {err['msg']}", field) from None


async def chat_completions(request: Request) -> Any:
    """``POST /v1/chat/completions``: the caption of the one image in the messages."""
    from medcap.infer.serve.app import _service, check_token, client_gone, run_unless_client_leaves

    t0 = time.perf_counter()
    check_token(request)
    s = _service(request)
    s.metrics.requests += 1
    req = await _read_request(request)
    if req.model != s.model_id:
        raise ServeError(
            404,
            "model_not_found",
            f"the model {req.model!r} is not served here; this service serves {s.model_id!r}",
            "model",
        )
    _refuse_unsupported(req)
    gen = generation_of(req, s.gen_defaults, s.limits)
    data, name, field = image_of(req)
    finished, outcome = await run_unless_client_leaves(request, _caption_one(s, data, name, field, gen))
    if not finished:
        return client_gone(request, t0, "while its image was decoded or captioned")
    caption, reason = outcome
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not req.stream:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": s.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": caption},
                    "finish_reason": reason,
                    "logprobs": None,
                }
            ],
        }
    return StreamingResponse(
        _chunks(completion_id, created, s.model_id, caption, reason), media_type="text/event-stream"
    )


async def _caption_one(s: Any, data: bytes, name: str, field: str, gen: GenerateConfig) -> tuple[str, str]:
    """Check, decode (through the decode gate) and caption one image; ``(caption, finish_reason)``."""
    try:
        header = await anyio.to_thread.run_sync(check_upload, data, name, 0, s.limits)
        decoded = await s.gate.run(
            header.decode_peak_bytes, decode_upload, data, name, 0, header, s.read, s.shrink, False
        )
    except ServeError as e:
        e.field = field if e.field == "files[0]" else e.field
        raise
    (future,) = s.batcher.submit([decoded.image], gen)
    try:
        outcome = await future
    except Exception as e:  # the worker has logged the traceback
        from medcap.data.images import plain_message

        raise ServeError(
            500,
            "generation_failed",
            f"the model failed on this request: {type(e).__name__}: {plain_message(e)}",
        ) from None
    s.metrics.images += 1
    caption = outcome["caption"]
    # "length" when the caption used every token it was allowed (re-tokenized: the worker returns text).
    used = s.count_tokens(caption)
    return caption, "length" if used >= gen.max_new_tokens else "stop"


async def _chunks(
    completion_id: str, created: int, model: str, caption: str, reason: str
) -> AsyncIterator[str]:
    """The answer as OpenAI's server-sent ``chat.completion.chunk`` events, then ``[DONE]``."""

    def event(delta: dict[str, Any], finish: str | None) -> str:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""}, None)
    await asyncio.sleep(0)
    yield event({"content": caption}, None)
    yield event({}, reason)
    yield "data: [DONE]\n\n"


__all__ = [
    "OPENAI_PATHS",
    "ChatCompletionRequest",
    "chat_completions",
    "list_models",
    "openai_error",
    "served_model_id",
]
