"""Every Prometheus metric kiln exports, declared once.

Metrics live in a ``CollectorRegistry`` owned by the app (one per ``create_app``),
so tests get a private registry. Names follow Prometheus conventions: base units,
``_total`` counters, histograms (they add up across replicas, summaries don't).
Labels stay low-cardinality: engine name, version, protocol, status code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from service.lifecycle.states import VersionState

# Millisecond-scale inference on CPUs and GPUs: 100 µs up to 10 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BUILD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
BUILD_RESULTS = ("succeeded", "failed", "cached")


class KilnMetrics:
    """The metric objects of one server. ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, registry: CollectorRegistry | None = None, *, cluster: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kiln_requests",
            "Inference requests answered, by status code",
            ["engine", "version", "protocol", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "kiln_request_duration_seconds",
            "Time in server per inference request",
            ["engine", "version", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_outcomes = Summary(
            "kiln_request_outcome_seconds",
            "Time in server per inference request, by outcome (success: answered 200; "
            "failure: any error): Triton's success and fail statistics",
            ["engine", "version", "outcome"],
            registry=r,
        )
        self.queue_duration = Histogram(
            "kiln_queue_duration_seconds",
            "Time a request waited in the batch queue",
            ["engine", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "kiln_compute_duration_seconds",
            "Time of one batch run on the engine",
            ["engine", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Rows per batch run",
            ["engine", "version"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_runs = Summary(
            "kiln_batch_run_seconds",
            "Time of batch runs, by batch size (rows): Triton's batch statistics",
            ["engine", "version", "batch_size"],
            registry=r,
        )
        self.request_compute = Counter(
            "kiln_request_compute_seconds",
            "Run time of each request's batch, summed over requests (a batch of n requests "
            "adds its run time n times): Triton's compute_infer statistic",
            ["engine", "version"],
            registry=r,
        )
        self.last_inference = Gauge(
            "kiln_last_inference_timestamp_seconds",
            "Unix time of the last batch run",
            ["engine", "version"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Requests waiting in the batch queue",
            ["engine", "version"],
            registry=r,
        )
        self.inferences = Counter(
            "kiln_inferences",
            "Rows inferred (batch items)",
            ["engine", "version"],
            registry=r,
        )
        self.batch_delay = Gauge(
            "kiln_batch_delay_seconds",
            "Queue delay the adaptive batcher chose (engines with a latency target)",
            ["engine", "version"],
            registry=r,
        )
        self.batches = Counter(
            "kiln_batches",
            "Batch runs (executions)",
            ["engine", "version"],
            registry=r,
        )
        self.rejections = Counter(
            "kiln_rejected_requests",
            "Requests not run because of overload or a deadline, by reason: queue_full, "
            "deadline_unmeetable (refused on arrival), queue_timeout (standing queue), shed (for "
            "higher-priority work), stopping, deadline (passed, or too close to run)",
            ["engine", "version", "reason"],
            registry=r,
        )
        self.load_ratio = Gauge(
            "kiln_engine_load_ratio",
            "Demand over capacity: rows arriving per second (refused ones too, averaged over about "
            "10 s) over the rows per second the engine runs at full batches on all its instances; "
            "above 1 the engine is overloaded",
            ["engine", "version"],
            registry=r,
        )
        self.batch_reruns = Counter(
            "kiln_batch_reruns",
            "Batches of several requests that failed and were run again one request at a time",
            ["engine", "version"],
            registry=r,
        )
        self.builds = Counter(
            "kiln_engine_builds",
            "Engine builds by result: succeeded (built here), failed (an attempt, retries included), "
            "cached (a version that got an engine already built)",
            ["result"],
            registry=r,
        )
        self.build_duration = Histogram(
            "kiln_engine_build_duration_seconds",
            "Wall time of engine builds",
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.engines = Gauge(
            "kiln_engines",
            "Engine versions by state",
            ["state"],
            registry=r,
        )
        self.serving = Gauge(
            "kiln_engine_serving",
            "1 for the engine that serves each loaded version: its tier (baseline: the model at "
            "FP32 on ONNX Runtime while the optimized engine builds; optimized), backend and precision",
            ["engine", "version", "tier", "backend", "precision"],
            registry=r,
        )
        self.fallback = Gauge(
            "kiln_engine_fallback",
            "1 while a version serves but not as requested (state fallback: its requested "
            "FP16 or INT8 engine failed, or the transform left every op in FP32); 0 otherwise",
            ["engine", "version"],
            registry=r,
        )
        # Cluster mode (a PostgreSQL catalog); kept but not exported on a single node.
        self.catalog = CatalogMetrics(r if cluster else None)
        for result in BUILD_RESULTS:
            self.builds.labels(result)
        for state in VersionState:
            self.engines.labels(str(state)).set(0)

    def engine_observer(self, engine: str, version: int) -> EngineObserver:
        return EngineObserver(self, engine, str(version))

    def set_serving(self, engine: str, version: int, tier: str, backend: str, precision: str) -> None:
        """Mark the engine that now serves a version (its previous series goes)."""
        self.serving.remove_by_labels({"engine": engine, "version": str(version)})
        self.serving.labels(engine, str(version), tier, backend, precision).set(1)

    def forget_engine(self, engine: str, version: int) -> None:
        """Drop an unloaded version's series so label sets don't pile up."""
        labels = {"engine": engine, "version": str(version)}
        for family in (
            self.serving,
            self.fallback,
            self.queue_duration,
            self.compute_duration,
            self.batch_size,
            self.queue_depth,
            self.batch_delay,
            self.inferences,
            self.batches,
            self.request_compute,
            self.last_inference,
            self.requests,
            self.request_duration,
            self.request_outcomes,
            self.batch_runs,
            self.rejections,
            self.load_ratio,
            self.batch_reruns,
        ):
            family.remove_by_labels(labels)

    def statistics(self, engine: str, version: int) -> dict[str, Any]:
        """One version's statistics in Triton's form (the statistics extension), read
        from the Prometheus series above: the two always agree."""
        labels = {"engine": engine, "version": str(version)}
        values: dict[str, float] = {}
        batches: dict[int, dict[str, float]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if any(sample.labels.get(k) != v for k, v in labels.items()):
                    continue
                outcome = sample.labels.get("outcome")
                size = sample.labels.get("batch_size")
                if size is not None:
                    batches.setdefault(int(size), {})[sample.name] = sample.value
                else:
                    values[sample.name + (f":{outcome}" if outcome else "")] = sample.value

        def duration(count_name: str, seconds_name: str) -> dict[str, int]:
            return {"count": int(values.get(count_name, 0)), "ns": round(values.get(seconds_name, 0) * 1e9)}

        outcome = "kiln_request_outcome_seconds"
        compute = duration("kiln_queue_duration_seconds_count", "kiln_request_compute_seconds_total")
        # kiln times a batch run as one phase (gather, engine, split): it is all compute_infer.
        no_phase = {"count": compute["count"], "ns": 0}
        return {
            "name": engine,
            "version": str(version),
            "last_inference": round(values.get("kiln_last_inference_timestamp_seconds", 0) * 1000),
            "inference_count": int(values.get("kiln_inferences_total", 0)),
            "execution_count": int(values.get("kiln_batches_total", 0)),
            "inference_stats": {
                "success": duration(f"{outcome}_count:success", f"{outcome}_sum:success"),
                "fail": duration(f"{outcome}_count:failure", f"{outcome}_sum:failure"),
                "queue": duration("kiln_queue_duration_seconds_count", "kiln_queue_duration_seconds_sum"),
                "compute_input": no_phase,
                "compute_infer": compute,
                "compute_output": no_phase,
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": int(runs["kiln_batch_run_seconds_count"]), "ns": 0},
                    "compute_infer": {
                        "count": int(runs["kiln_batch_run_seconds_count"]),
                        "ns": round(runs["kiln_batch_run_seconds_sum"] * 1e9),
                    },
                    "compute_output": {"count": int(runs["kiln_batch_run_seconds_count"]), "ns": 0},
                }
                for size, runs in sorted(batches.items())
            ],
            "memory_usage": [],
        }


class CatalogMetrics:
    """How this replica agrees with the others through the catalog."""

    def __init__(self, r: CollectorRegistry | None) -> None:
        self.up = Gauge("kiln_catalog_up", "1 while the catalog database answers", registry=r)
        self.reconcile_lag = Gauge(
            "kiln_catalog_reconcile_lag_seconds",
            "Seconds since this replica last matched the catalog in full",
            registry=r,
        )
        self.replicas_ready = Gauge(
            "kiln_catalog_replicas_ready",
            "Live replicas that serve each version, as the catalog reports",
            ["engine", "version"],
            registry=r,
        )
        self.lease_takeovers = Counter(
            "kiln_catalog_lease_takeovers",
            "Build leases this replica took over after their holder's lease expired",
            registry=r,
        )
        self.builds_skipped = Counter(
            "kiln_catalog_builds_skipped",
            "Engines this replica loaded without building, because another replica built them",
            registry=r,
        )
        self.commits_refused = Counter(
            "kiln_catalog_commits_refused",
            "Builds whose commit was fenced out because their lease had passed to another replica",
            registry=r,
        )


class EngineObserver:
    """The batcher's view of the metrics for one engine version (pre-bound labels)."""

    def __init__(self, metrics: KilnMetrics, engine: str, version: str) -> None:
        self._labels = (engine, version)
        self._batch_runs = metrics.batch_runs
        self._runs_by_size: dict[int, Any] = {}
        self._request_compute = metrics.request_compute.labels(engine, version)
        self._last_inference = metrics.last_inference.labels(engine, version)
        self._queue_depth = metrics.queue_depth.labels(engine, version)
        self._queue_duration = metrics.queue_duration.labels(engine, version)
        self._compute = metrics.compute_duration.labels(engine, version)
        self._batch_size = metrics.batch_size.labels(engine, version)
        self._inferences = metrics.inferences.labels(engine, version)
        self._batches = metrics.batches.labels(engine, version)
        self._delay = metrics.batch_delay.labels(engine, version)
        self._load_ratio = metrics.load_ratio.labels(engine, version)
        self._reruns = metrics.batch_reruns.labels(engine, version)

    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def batch_done(self, rows: int, requests: int, compute_s: float, queue_waits_s: list[float]) -> None:
        self._batch_size.observe(rows)
        self._compute.observe(compute_s)
        self._inferences.inc(rows)
        self._batches.inc()
        runs = self._runs_by_size.get(rows)
        if runs is None:
            runs = self._runs_by_size[rows] = self._batch_runs.labels(*self._labels, str(rows))
        runs.observe(compute_s)
        self._request_compute.inc(compute_s * requests)
        self._last_inference.set(time.time())
        for wait in queue_waits_s:
            self._queue_duration.observe(wait)

    def adapted(self, delay_s: float, batch_cap: int) -> None:
        self._delay.set(delay_s)

    def reran(self, requests: int) -> None:
        self._reruns.inc()

    def load_ratio_from(self, read: Callable[[], float]) -> None:
        """Read the load ratio from ``read`` at every scrape."""
        self._load_ratio.set_function(read)
