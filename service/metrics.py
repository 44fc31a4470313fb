"""Prometheus metrics of one app instance, in its own registry.

Each :class:`Metrics` owns a ``CollectorRegistry`` (not the process-wide default), so tests
can build many apps in one process and ``/metrics`` shows only this app's series. It is also
the batcher's :class:`~service.batcher.BatchObserver`.

Series (``kgdx_`` prefix):

- ``kgdx_requests_total{route, method, status}``: requests answered;
- ``kgdx_request_duration_seconds{route}``: time to answer, histogram;
- ``kgdx_queue_seconds``: each request's wait for its inference batch, histogram;
- ``kgdx_inference_seconds``: each batch's compute time, histogram;
- ``kgdx_batch_size``: requests per batch, histogram (buckets 1, 2, 4, ..., 128);
- ``kgdx_queue_depth``: requests waiting for the inference worker, gauge.

``route`` is the route template (``/v1/results/{result_id}``), never the raw path, so ids do
not multiply the series.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Request latency buckets (seconds): sub-millisecond health checks to slow CPU inference.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: Queue wait buckets (seconds): a few ms of batching window up to a request timeout.
QUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The service's Prometheus metrics (see the module docstring for the series).

    Args:
        registry: where to register the metrics; a new ``CollectorRegistry`` by default.

    Example::

        metrics = Metrics()
        metrics.requests.labels("/v1/predict", "POST", "200").inc()
        batcher = DynamicBatcher(fn, observer=metrics)
        body, content_type = metrics.render()
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "kgdx_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "kgdx_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "kgdx_queue_seconds",
            "Time a request waited in the inference queue before its batch started.",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "kgdx_inference_seconds",
            "Compute time of one inference batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kgdx_batch_size",
            "Requests per inference batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "kgdx_queue_depth",
            "Requests waiting for the inference worker.",
            registry=self.registry,
        )

    def on_batch(self, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """Record one inference batch (the :class:`~service.batcher.BatchObserver` hook)."""
        self.batch_size.observe(size)
        for seconds in queue_seconds:
            self.queue_seconds.observe(max(0.0, seconds))
        self.inference_seconds.observe(max(0.0, compute_seconds))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(max(0.0, seconds))

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth()`` at every scrape (e.g. a batcher's
        ``lambda: batcher.queue_depth``), instead of setting the gauge by hand."""
        self.queue_depth.set_function(depth)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
