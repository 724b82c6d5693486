"""``GET /metrics`` in Prometheus's text format, with prometheus-client.

Two sources, one registry per app (tests and embedders build several apps in one process):

* ``HttpMetricsMiddleware`` observes every HTTP request: ``medcap_http_requests_total{endpoint,
  method, code}`` and the latency histogram ``medcap_http_request_duration_seconds{endpoint}``
  (endpoints are the service's routes, so unknown paths cannot blow up the label set);
* ``ServiceCollector`` reads the service's own counters (``ServeMetrics``, the ones ``/v1/metrics``
  shows as JSON) at scrape time: caption requests, images, errors by status code, client
  disconnects, batches and their sizes as a histogram, model time, the queue depth and the decodes
  in flight.

``/metrics`` needs no token (like ``/healthz``): it holds counts and timings only, and Prometheus
scrapes it without credentials by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response

#: Latency buckets (seconds): a tiny model on a CPU answers in milliseconds, a 3B model on a busy GPU
#: with a full queue in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: Batch-size buckets (images per model call).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

#: Route paths reported as themselves; anything else is "other" (or the mount's prefix).
KNOWN_PATHS = (
    "/",
    "/healthz",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/v1/model",
    "/v1/metrics",
    "/v1/captions",
    "/v1/models",
    "/v1/chat/completions",
)
MOUNTS = ("/static", "/docs-static")


def endpoint_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    for mount in MOUNTS:
        if path.startswith(mount + "/"):
            return mount
    return "other"


class ServiceCollector(Collector):
    """The service's counters, read when Prometheus scrapes."""

    def __init__(self, metrics: Any, queue_depth: Callable[[], int], decodes: Callable[[], dict[str, Any]]):
        self.metrics, self.queue_depth, self.decodes = metrics, queue_depth, decodes

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        yield CounterMetricFamily(
            "medcap_caption_requests",
            "Caption requests (POST /v1/captions and /v1/chat/completions)",
            m.requests,
        )
        yield CounterMetricFamily("medcap_images", "Images captioned", m.images)
        errors = CounterMetricFamily(
            "medcap_errors",
            "Requests the service answered with an error, by HTTP status code",
            labels=["code"],
        )
        for code, count in sorted(m.errors.items()):
            errors.add_metric([str(code)], count)
        yield errors
        yield CounterMetricFamily(
            "medcap_client_disconnects",
            "Requests whose client left before the answer (logged as 499)",
            m.disconnects,
        )
        yield CounterMetricFamily("medcap_batches", "Model calls (batches) of the batching worker", m.batches)
        # Cumulative, as Prometheus histograms are: batches of at most `bound` images.
        buckets = [
            (floatToGoString(bound), sum(v for k, v in m.batch_sizes.items() if k <= bound))
            for bound in BATCH_BUCKETS
        ]
        buckets_out = [*buckets, ("+Inf", m.batches)]
        yield HistogramMetricFamily(
            "medcap_batch_size", "Images per model call", buckets=buckets_out, sum_value=m.images_in_batches
        )
        yield CounterMetricFamily(
            "medcap_generate_seconds", "Seconds the model spent generating captions", m.generate_seconds
        )
        yield GaugeMetricFamily(
            "medcap_queue_depth", "Images submitted and not yet captioned", self.queue_depth()
        )
        decodes = self.decodes()
        yield GaugeMetricFamily(
            "medcap_decode_bytes_in_flight",
            "Estimated memory of the image decodes in flight",
            decodes.get("in_flight_bytes", 0),
        )


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by endpoint (pure ASGI: also covers refusals made before
    routing, such as a body over the size limit)."""

    def __init__(self, app: Any, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "medcap_http_requests",
            "HTTP requests by endpoint, method and status code",
            ["endpoint", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "medcap_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler ends as a 500

        async def observed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            endpoint = endpoint_label(scope.get("path", ""))
            self.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)


async def prometheus_metrics(request: Request) -> Response:
    """``GET /metrics``: everything above in Prometheus's text format."""
    registry = request.app.state.prometheus
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["HttpMetricsMiddleware", "ServiceCollector", "endpoint_label", "prometheus_metrics"]
