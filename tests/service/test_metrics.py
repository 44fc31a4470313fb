"""Prometheus metrics: own registry per instance, batch observer, exposition format."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.batcher import DynamicBatcher
from service.metrics import BATCH_SIZE_BUCKETS, Metrics

NAMES = {
    "kgdx_requests",
    "kgdx_request_duration_seconds",
    "kgdx_queue_seconds",
    "kgdx_inference_seconds",
    "kgdx_batch_size",
    "kgdx_queue_depth",
}


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_instances_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()  # a shared registry would raise "Duplicated timeseries"
    a.requests.labels("/healthz", "GET", "200").inc()
    assert _value(a, "kgdx_requests_total", route="/healthz", method="GET", status="200") == 1
    assert _value(b, "kgdx_requests_total", route="/healthz", method="GET", status="200") == 0


def test_a_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.registry is registry
    metrics.queue_depth.set(3)
    assert registry.get_sample_value("kgdx_queue_depth") == 3


def test_render_is_prometheus_text_with_every_series() -> None:
    metrics = Metrics()
    metrics.observe_request("/v1/predict", "POST", 200, 0.12)
    metrics.observe_request("/v1/predict", "POST", 415, 0.003)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(families) >= NAMES
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in families["kgdx_requests"].samples
    }
    key = ("kgdx_requests_total", (("method", "POST"), ("route", "/v1/predict"), ("status", "415")))
    assert samples[key] == 1
    assert _value(metrics, "kgdx_request_duration_seconds_count", route="/v1/predict") == 2


@pytest.mark.parametrize(
    ("size", "le_hit", "le_miss"), [(1, "1.0", None), (3, "4.0", "2.0"), (16, "16.0", "8.0")]
)
def test_on_batch_fills_the_histograms(size: int, le_hit: str, le_miss: str | None) -> None:
    metrics = Metrics()
    metrics.on_batch(size, [0.001 * (i + 1) for i in range(size)], 0.05)
    assert _value(metrics, "kgdx_batch_size_bucket", le=le_hit) == 1
    if le_miss is not None:
        assert _value(metrics, "kgdx_batch_size_bucket", le=le_miss) == 0
    assert _value(metrics, "kgdx_batch_size_count") == 1
    assert _value(metrics, "kgdx_queue_seconds_count") == size
    assert _value(metrics, "kgdx_queue_seconds_sum") == pytest.approx(
        sum(0.001 * (i + 1) for i in range(size))
    )
    assert _value(metrics, "kgdx_inference_seconds_sum") == pytest.approx(0.05)


def test_batch_size_buckets() -> None:
    assert BATCH_SIZE_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128)
    body, _ = Metrics().render()
    for le in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "+Inf"):
        assert f'kgdx_batch_size_bucket{{le="{le}"}}'.encode() in body


def test_metrics_observe_a_real_batcher() -> None:
    metrics = Metrics()

    async def main() -> None:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            lambda items: [i + 1 for i in items], max_batch_size=8, max_wait_ms=30, observer=metrics
        )
        metrics.track_queue_depth(lambda: batcher.queue_depth)
        await batcher.start()
        assert await asyncio.gather(*(batcher.submit(i) for i in range(6))) == [1, 2, 3, 4, 5, 6]
        await batcher.stop()

    asyncio.run(main())
    assert _value(metrics, "kgdx_queue_seconds_count") == 6
    assert _value(metrics, "kgdx_batch_size_sum") == 6
    assert _value(metrics, "kgdx_batch_size_count") < 6  # some requests shared a batch
    assert _value(metrics, "kgdx_queue_depth") == 0
