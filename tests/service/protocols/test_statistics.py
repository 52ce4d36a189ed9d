"""Triton's statistics are read from the Prometheus series: what the batcher and
the request path report shows up in both, and unloading a version forgets it."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.metrics import KilnMetrics


def test_statistics_follow_the_counters() -> None:
    metrics = KilnMetrics()
    observer = metrics.engine_observer("mlp", 1)
    observer.batch_done(rows=4, requests=2, compute_s=0.010, queue_waits_s=[0.001, 0.002])
    observer.batch_done(rows=1, requests=1, compute_s=0.004, queue_waits_s=[0.0005])
    observer.batch_done(rows=4, requests=4, compute_s=0.012, queue_waits_s=[0.0] * 4)
    metrics.request_outcomes.labels("mlp", "1", "success").observe(0.02)
    metrics.request_outcomes.labels("mlp", "1", "failure").observe(0.001)
    metrics.engine_observer("other", 1).batch_done(8, 8, 1.0, [1.0] * 8)  # not counted for mlp

    stats = metrics.statistics("mlp", 1)

    assert (stats["name"], stats["version"]) == ("mlp", "1")
    assert stats["inference_count"] == 9
    assert stats["execution_count"] == 3
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert inference["success"] == {"count": 1, "ns": 20_000_000}
    assert inference["fail"] == {"count": 1, "ns": 1_000_000}
    assert inference["queue"] == {"count": 7, "ns": 3_500_000}
    # Each request is charged its batch's run time: 2 x 10 ms + 4 ms + 4 x 12 ms.
    assert inference["compute_infer"] == {"count": 7, "ns": 72_000_000}
    assert inference["compute_input"] == inference["compute_output"] == {"count": 7, "ns": 0}
    assert [(b["batch_size"], b["compute_infer"]) for b in stats["batch_stats"]] == [
        (1, {"count": 1, "ns": 4_000_000}),
        (4, {"count": 2, "ns": 22_000_000}),
    ]
    assert b'kiln_batch_run_seconds_count{batch_size="4",engine="mlp",version="1"} 2.0' in generate_latest(
        metrics.registry
    )


def test_forgetting_a_version_clears_its_statistics() -> None:
    metrics = KilnMetrics()
    metrics.engine_observer("mlp", 1).batch_done(2, 2, 0.01, [0.0, 0.0])
    metrics.request_outcomes.labels("mlp", "1", "success").observe(0.02)
    metrics.forget_engine("mlp", 1)
    stats = metrics.statistics("mlp", 1)
    assert stats["inference_count"] == 0 and stats["batch_stats"] == []
    assert stats["inference_stats"]["success"] == {"count": 0, "ns": 0}
    assert b'engine="mlp"' not in generate_latest(metrics.registry)
