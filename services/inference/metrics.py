"""Prometheus metrics: requests by route and status, latency, batch sizes, model in use.

Each app gets its own CollectorRegistry, so several apps in one process (unit tests)
never collide on metric names.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("leukofed_http_requests_total", "HTTP requests",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("leukofed_http_request_seconds", "HTTP request latency",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("leukofed_batch_size", "Images per onnxruntime run",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("leukofed_batch_seconds", "onnxruntime run time",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("leukofed_images_total", "Images classified", registry=r)
        self.model_info = Gauge("leukofed_model_info", "The model version in use (value 1)",
                                ["name", "version", "alias", "provider"], registry=r)
        self.model_version = Gauge("leukofed_model_version", "Version number in use",
                                   registry=r)
        self.swaps = Counter("leukofed_model_swaps_total", "Model loads and hot swaps",
                             registry=r)
        self.ready = Gauge("leukofed_ready", "1 when a model is loaded", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def model_swapped(self, model: Any) -> None:
        self.model_info.clear()
        self.model_info.labels(model.name, model.version, model.alias or "",
                               model.providers[0]).set(1)
        with contextlib.suppress(ValueError):
            self.model_version.set(float(model.version))
        self.swaps.inc()
        self.ready.set(1)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead on the hot path). Labels use the route
    template (``/v2/models/{name}/infer``), never the raw path, to bound cardinality."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            # Any method a client invents would be a new label (unbounded cardinality).
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(time.perf_counter() - started)
