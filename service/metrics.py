"""Every Prometheus metric kiln exports, declared once.

Metrics live in a ``CollectorRegistry`` owned by the app (one per ``create_app``),
so tests get a private registry. Names follow Prometheus conventions: base units,
``_total`` counters, histograms (they add up across replicas, summaries don't).
Labels stay low-cardinality: engine name, version, protocol, status code.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
            "Requests refused by the batcher before running",
            ["engine", "version", "reason"],
            registry=r,
        )
        self.builds = Counter(
            "kiln_engine_builds",
            "Engine builds by result",
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
        self._serving_labels: dict[tuple[str, str], tuple[str, ...]] = {}
        for result in BUILD_RESULTS:
            self.builds.labels(result)
        for state in VersionState:
            self.engines.labels(str(state)).set(0)

    def engine_observer(self, engine: str, version: int) -> EngineObserver:
        return EngineObserver(self, engine, str(version))

    def set_serving(self, engine: str, version: int, tier: str, backend: str, precision: str) -> None:
        """Mark the engine that now serves a version (its previous series goes)."""
        key = (engine, str(version))
        previous = self._serving_labels.pop(key, None)
        if previous is not None:
            self.serving.remove(*previous)
        labels = (*key, tier, backend, precision)
        self.serving.labels(*labels).set(1)
        self._serving_labels[key] = labels

    def forget_engine(self, engine: str, version: int) -> None:
        """Drop an unloaded version's series so label sets don't pile up."""
        labels = (engine, str(version))
        serving = self._serving_labels.pop(labels, None)
        if serving is not None:
            self.serving.remove(*serving)
        for metric in (
            self.queue_duration,
            self.compute_duration,
            self.batch_size,
            self.queue_depth,
            self.batch_delay,
            self.inferences,
            self.batches,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(*labels)


class EngineObserver:
    """The batcher's view of the metrics for one engine version (pre-bound labels)."""

    def __init__(self, metrics: KilnMetrics, engine: str, version: str) -> None:
        self._queue_depth = metrics.queue_depth.labels(engine, version)
        self._queue_duration = metrics.queue_duration.labels(engine, version)
        self._compute = metrics.compute_duration.labels(engine, version)
        self._batch_size = metrics.batch_size.labels(engine, version)
        self._inferences = metrics.inferences.labels(engine, version)
        self._batches = metrics.batches.labels(engine, version)
        self._delay = metrics.batch_delay.labels(engine, version)
        self._rejections = {
            reason: metrics.rejections.labels(engine, version, reason)
            for reason in ("queue_full", "deadline", "stopping")
        }

    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def batch_done(self, rows: int, requests: int, compute_s: float, queue_waits_s: list[float]) -> None:
        self._batch_size.observe(rows)
        self._compute.observe(compute_s)
        self._inferences.inc(rows)
        self._batches.inc()
        for wait in queue_waits_s:
            self._queue_duration.observe(wait)

    def adapted(self, delay_s: float, batch_cap: int) -> None:
        self._delay.set(delay_s)

    def rejected(self, reason: str) -> None:
        counter = self._rejections.get(reason)
        if counter is not None:
            counter.inc()
