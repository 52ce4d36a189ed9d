"""The live-traffic sampler: quantiles from histogram buckets, one point per engine from
the server's own metrics, and a window that forgets deleted engines."""

from __future__ import annotations

import math

import pytest

from service.metrics import KilnMetrics
from service.ui.sampler import Reading, TrafficSampler, histogram_quantile, point, read_metrics


def test_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    buckets = {0.001: 50.0, 0.01: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.001 + 0.009 * 49 / 50)
    assert histogram_quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None


def test_quantile_above_the_largest_bucket_is_its_bound() -> None:
    assert histogram_quantile(0.99, {0.5: 10.0, math.inf: 100.0}) == 0.5


def observe(metrics: KilnMetrics, engine: str, code: str, seconds: float) -> None:
    metrics.requests.labels(engine, "1", "native", code).inc()
    metrics.request_duration.labels(engine, "1", "native").observe(seconds)


def test_point_is_the_change_between_two_readings_summed_over_versions_and_protocols() -> None:
    metrics = KilnMetrics()
    observe(metrics, "a", "200", 0.5)  # before the first reading: not in the point
    before = read_metrics(metrics)
    for _ in range(8):
        observe(metrics, "a", "200", 0.002)
    observe(metrics, "a", "503", 0.002)
    metrics.requests.labels("a", "2", "v2", "200").inc()  # another version and protocol
    observer = metrics.engine_observer("a", 1)
    observer.batch_done(rows=6, requests=3, compute_s=0.001, queue_waits_s=[0.001, 0.003, 0.002])
    observer.batch_done(rows=2, requests=1, compute_s=0.001, queue_waits_s=[0.002])
    values = point(read_metrics(metrics)["a"], before["a"], seconds=2.0)
    assert values["rps"] == pytest.approx(10 / 2)
    assert values["errors"] == pytest.approx(1 / 2)
    assert 1.0 < values["p50_ms"] <= 2.5 and 1.0 < values["p99_ms"] <= 2.5  # all in the 1-2.5 ms bucket
    assert values["queue_ms"] == pytest.approx(2.0)
    assert values["batch"] == pytest.approx(4.0)


def test_an_idle_engine_has_zero_rate_and_no_latency() -> None:
    values = point(Reading(), Reading(), 1.0)
    assert values == {
        "rps": 0.0,
        "errors": 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "queue_ms": None,
        "batch": None,
    }


def test_a_deleted_version_restarts_the_sums_instead_of_going_negative() -> None:
    metrics = KilnMetrics()
    for _ in range(5):
        metrics.engine_observer("a", 1).batch_done(rows=1, requests=1, compute_s=0.001, queue_waits_s=[0.001])
    before = read_metrics(metrics)
    metrics.forget_engine("a", 1)
    metrics.engine_observer("a", 2).batch_done(rows=3, requests=1, compute_s=0.001, queue_waits_s=[0.001])
    assert point(read_metrics(metrics)["a"], before["a"], 1.0)["batch"] == pytest.approx(3.0)


def test_sampler_keeps_a_window_per_engine_and_forgets_deleted_ones() -> None:
    metrics = KilnMetrics()
    names = ["a", "b"]
    sampler = TrafficSampler(metrics, lambda: names, interval_s=1.0, window_s=3.0)
    for _ in range(5):
        observe(metrics, "a", "200", 0.001)
        sampler.sample()
    series = sampler.series("a")
    assert len(series["t"]) == 3 and series["t"] == sorted(series["t"])
    assert all(rate > 0 for rate in series["rps"])
    assert sampler.series("b")["rps"] == [0.0, 0.0, 0.0]
    assert sampler.latest("a")["rps"] == series["rps"][-1]
    names.remove("a")
    sampler.sample()
    assert sampler.series("a")["t"] == []
    assert sampler.latest("a")["rps"] is None


def test_readings_agree_with_what_prometheus_exports() -> None:
    metrics = KilnMetrics()
    for engine, version, code, seconds in [
        ("a", 1, "200", 0.003),
        ("a", 2, "429", 0.2),
        ("b", 1, "200", 7.0),
    ]:
        metrics.requests.labels(engine, str(version), "v2", code).inc(3)
        metrics.request_duration.labels(engine, str(version), "v2").observe(seconds)
        metrics.engine_observer(engine, version).batch_done(5, 2, 0.001, [seconds, seconds])
    exported: dict[tuple[str, str], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.labels.get("engine") and sample.name.endswith(("_total", "_count", "_sum", "_bucket")):
                key = (sample.labels["engine"], sample.name + sample.labels.get("le", ""))
                exported[key] = exported.get(key, 0.0) + sample.value
    readings = read_metrics(metrics)
    for engine, reading in readings.items():
        assert reading.requests == exported[(engine, "kiln_requests_total")]
        assert reading.queue_count == exported[(engine, "kiln_queue_duration_seconds_count")]
        assert reading.queue_sum == pytest.approx(exported[(engine, "kiln_queue_duration_seconds_sum")])
        assert reading.batch_count == exported[(engine, "kiln_batch_size_count")]
        assert reading.batch_sum == exported[(engine, "kiln_batch_size_sum")]
        for bound, count in reading.latency_buckets.items():
            le = "+Inf" if math.isinf(bound) else repr(bound)
            assert count == exported[(engine, f"kiln_request_duration_seconds_bucket{le}")], (engine, le)
    assert readings["a"].errors == 3 and readings["b"].errors == 0
