"""Prometheus metrics of the API server (``GET /metrics``, text exposition format).

HTTP: requests by route, method and status, and their latency (histogram). Generation, per
language model: prompt tokens read, tokens generated, decoding throughput over the last
seconds, requests waiting (queue depth) and decoding (running batch size), and requests
cancelled, timed out or failed. Embeddings and classification: requests waiting.

Each application has its own :class:`CollectorRegistry`, so several apps in one process
(tests) do not mix their numbers. Worker numbers are read from the workers at scrape time.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from src.api.batching import MicroBatcher
from src.api.generation import GenerationWorker

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _WorkerCollector:
    """Reads the serving workers' counters when Prometheus scrapes."""

    def __init__(self, service) -> None:
        self.service = service

    def collect(self):
        workers = list(self.service.workers().values())
        generators = [w for w in workers if isinstance(w, GenerationWorker)]
        families = {
            "prompt": CounterMetricFamily("mark_prompt_tokens", "prompt tokens read (prefilled)", labels=["model"]),
            "generated": CounterMetricFamily("mark_generated_tokens", "tokens generated", labels=["model"]),
            "tps": GaugeMetricFamily("mark_generation_tokens_per_second", "tokens generated per second over the last 10 s", labels=["model"]),
            "queue": GaugeMetricFamily("mark_queue_depth", "requests waiting for a worker", labels=["worker"]),
            "batch": GaugeMetricFamily("mark_running_batch_size", "requests decoding together right now", labels=["model"]),
            "cancelled": CounterMetricFamily("mark_generation_cancelled", "generations dropped because the client left", labels=["model"]),
            "timed_out": CounterMetricFamily("mark_generation_timed_out", "generations failed by the request timeout", labels=["model"]),
            "failed": CounterMetricFamily("mark_generation_failed", "generations failed by an error in prefill or decoding", labels=["model"]),
        }
        for worker in generators:
            label = [worker.name]
            families["prompt"].add_metric(label, worker.prompt_tokens_read)
            families["generated"].add_metric(label, worker.tokens_generated)
            families["tps"].add_metric(label, worker.tokens_per_second())
            families["queue"].add_metric([f"generate:{worker.name}"], worker.pending)
            families["batch"].add_metric(label, worker.active)
            families["cancelled"].add_metric(label, worker.cancelled)
            families["timed_out"].add_metric(label, worker.timed_out)
            families["failed"].add_metric(label, worker.failed)
        for worker in workers:
            if isinstance(worker, MicroBatcher):
                families["queue"].add_metric([worker.name], worker.pending)
        yield from families.values()


class Metrics:
    """The app's registry and HTTP metrics; ``render()`` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mark_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mark_http_request_duration_seconds", "time from request to the last byte of the response",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_WorkerCollector(service))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware (outermost) timing every HTTP request, rejected ones included.

    The route label is the matched route's path template (``/v1/completions``), or
    ``unmatched`` for paths no route serves, so scanners cannot blow up the label set.
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(route, scope.get("method", ""), status, time.perf_counter() - start)
