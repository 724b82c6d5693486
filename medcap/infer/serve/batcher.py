"""The batching worker: gathers queued images into batches of equal generation options and runs the
model on them one batch at a time, in one thread."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medcap.config.generate import GenerateConfig
from medcap.infer.serve.schemas import BatchSettings, ServeError

log = logging.getLogger("medcap.serve")


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
    disconnects: int = 0
    """Requests whose client went away before the answer (logged as 499; not errors)."""
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
            "disconnects": self.disconnects,
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
            except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11; not on 3.10
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
