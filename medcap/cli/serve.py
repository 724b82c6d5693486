"""``medcap serve``: load the model and run the service on uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from medcap.infer.serve.app import create_app, log
from medcap.infer.serve.loading import load_for_serving
from medcap.infer.serve.schemas import BatchSettings, ServeLimits
from medcap.infer.serve.server import uvicorn_config


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcap serve",
        description="Serve captions over HTTP (POST /v1/captions) with a web page at /, the OpenAI-compatible "
        "API (GET /v1/models, POST /v1/chat/completions with a base64 data URL) and Prometheus metrics at /metrics.",
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
        "--concepts",
        help="concept model ('medcap concepts train' run) for a checkpoint trained with data.prompt_with: "
        "each image's predicted modality or concepts go into its prompt",
    )
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
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id of the OpenAI-compatible API (default: medcap/RUN for a checkpoint, medcap/FOLDER for "
        "an adapter, else the base model's name)",
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
    p.add_argument(
        "--max-decoded-mb",
        type=float,
        default=d.max_decoded_bytes / 2**20,
        help="largest decoded image (width x height x bytes per pixel, from the header); more gets 413",
    )
    p.add_argument(
        "--decode-budget-mb",
        type=float,
        default=d.decode_budget_bytes / 2**20,
        help="memory all decodes in flight may take together (by each image's estimate)",
    )
    p.add_argument(
        "--decode-workers",
        type=_positive_int,
        default=d.max_concurrent_decodes,
        help="images decoded at the same time",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout_s,
        help="seconds a connection may take to send its request headers",
    )
    p.add_argument(
        "--body-timeout", type=float, default=d.body_timeout_s, help="longest pause in a request body (408)"
    )
    p.add_argument(
        "--keep-alive", type=float, default=d.keep_alive_s, help="seconds an idle connection is kept open"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def cmd_serve(argv: list[str]) -> int:
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
            max_decoded_bytes=int(args.max_decoded_mb * 2**20),
            decode_budget_bytes=int(args.decode_budget_mb * 2**20),
            max_concurrent_decodes=args.decode_workers,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            keep_alive_s=args.keep_alive,
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
            model=args.model,
            checkpoint=args.checkpoint,
            adapter=args.adapter,
            device=args.device,
            concepts=args.concepts,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"medcap serve: {e}", file=sys.stderr)
        return 2
    guide = info.pop("guide", None)
    caption_fn = None
    if guide is not None:
        from medcap.infer.generate import caption_images

        caption_fn = guide.caption_fn(caption_images)
    app = create_app(
        model,
        processor,
        gen_defaults=gen,
        prompt=prompt,
        info=info,
        caption_fn=caption_fn,
        limits=limits,
        batching=batching,
        token=token,
        model_id=args.served_model_name,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning(
            "listening on %s without --token: anyone who can reach this port can use the model", args.host
        )
    print(
        f"medcap serve: http://{args.host}:{args.port}/  (API docs: /docs, schema: /openapi.json; OpenAI-compatible "
        f"API: http://{args.host}:{args.port}/v1 as model {app.state.service.model_id!r}; Prometheus: /metrics)",
        flush=True,
    )
    config = uvicorn_config(
        app,
        args.host,
        args.port,
        header_timeout_s=limits.header_timeout_s,
        keep_alive_s=limits.keep_alive_s,
        log_level=args.log_level,
    )
    uvicorn.Server(config).run()
    return 0
