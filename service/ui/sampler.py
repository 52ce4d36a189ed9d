"""Live traffic per engine over the last minutes, sampled from the server's own metrics.

Once a second the sampler reads the Prometheus counters and histograms that the
request path already keeps (no extra work per request), sums them per engine over
versions and protocols, and stores the change since the previous reading as one
point: requests/s, errors/s, p50 and p99 latency, mean queue time and mean batch
size. The page draws these; no Prometheus server is needed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from service.metrics import KilnMetrics

INTERVAL_S = 1.0
WINDOW_S = 300
SERIES = ("rps", "errors", "p50_ms", "p99_ms", "queue_ms", "batch")


@dataclass
class Reading:
    """Cumulative figures of one engine at one instant."""

    requests: float = 0.0
    errors: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    queue_sum: float = 0.0
    queue_count: float = 0.0
    batch_sum: float = 0.0
    batch_count: float = 0.0


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of cumulative histogram buckets, interpolated within a bucket
    as Prometheus's ``histogram_quantile`` does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # above the largest finite bucket: its bound is all we know
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def _children(metric: Any) -> list[tuple[dict[str, str], Any]]:
    """(labels, child) for every label set of a labelled metric.

    Reads prometheus-client's children directly: ``collect()`` builds a sample object
    per bucket and label set, 37 ms of event-loop time a second with 20 engines of two
    versions and two protocols, against 4 ms this way (docs/OPERATIONS.md).
    prometheus-client is pinned to one minor version, and the sampler's tests check
    these readings against ``collect()``.
    """
    names = metric._labelnames
    with metric._lock:
        items = list(metric._metrics.items())
    return [(dict(zip(names, values, strict=True)), child) for values, child in items]


def read_metrics(metrics: KilnMetrics) -> dict[str, Reading]:
    """Cumulative figures per engine, summed over versions, protocols and codes."""
    readings: dict[str, Reading] = {}
    for labels, child in _children(metrics.requests):
        r = readings.setdefault(labels["engine"], Reading())
        value = child._value.get()
        r.requests += value
        if not labels["code"].startswith("2"):
            r.errors += value
    for labels, child in _children(metrics.request_duration):
        buckets = readings.setdefault(labels["engine"], Reading()).latency_buckets
        cumulative = 0.0
        for bound, count in zip(child._upper_bounds, child._buckets, strict=True):
            cumulative += count.get()
            buckets[bound] = buckets.get(bound, 0.0) + cumulative
    for labels, child in _children(metrics.queue_duration):
        r = readings.setdefault(labels["engine"], Reading())
        r.queue_sum += child._sum.get()
        r.queue_count += sum(count.get() for count in child._buckets)
    for labels, child in _children(metrics.batch_size):
        r = readings.setdefault(labels["engine"], Reading())
        r.batch_sum += child._sum.get()
        r.batch_count += sum(count.get() for count in child._buckets)
    return readings


def _delta(now: float, before: float) -> float:
    # A deleted version's series disappear, so a sum can go down: count that as a restart.
    return now - before if now >= before else now


def point(now: Reading, before: Reading, seconds: float) -> dict[str, float | None]:
    """One point of every series from two readings ``seconds`` apart."""
    buckets = {b: _delta(c, before.latency_buckets.get(b, 0.0)) for b, c in now.latency_buckets.items()}
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    queue_n = _delta(now.queue_count, before.queue_count)
    batch_n = _delta(now.batch_count, before.batch_count)
    return {
        "rps": _delta(now.requests, before.requests) / seconds,
        "errors": _delta(now.errors, before.errors) / seconds,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "queue_ms": _delta(now.queue_sum, before.queue_sum) / queue_n * 1000 if queue_n else None,
        "batch": _delta(now.batch_sum, before.batch_sum) / batch_n if batch_n else None,
    }


class TrafficSampler:
    """Keeps ``WINDOW_S`` seconds of points per engine; ``run`` samples until cancelled."""

    def __init__(
        self,
        metrics: KilnMetrics,
        engine_names: Callable[[], Iterable[str]],
        interval_s: float = INTERVAL_S,
        window_s: float = WINDOW_S,
    ) -> None:
        self._metrics = metrics
        self._engine_names = engine_names
        self.interval_s = interval_s
        self.window_s = window_s
        self._length = max(1, int(window_s / interval_s))
        self._series: dict[str, dict[str, deque[Any]]] = {}
        self._previous = read_metrics(metrics)
        self._previous_at = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    def sample(self) -> None:
        """Read the metrics once and append one point per engine."""
        now, now_at = read_metrics(self._metrics), time.monotonic()
        seconds = max(now_at - self._previous_at, 1e-3)
        wall = round(time.time(), 3)
        names = set(self._engine_names())
        for gone in set(self._series) - names:
            del self._series[gone]
        for name in names:
            values = point(now.get(name, Reading()), self._previous.get(name, Reading()), seconds)
            series = self._series.get(name)
            if series is None:
                series = {key: deque(maxlen=self._length) for key in ("t", *SERIES)}
                self._series[name] = series
            series["t"].append(wall)
            for key in SERIES:
                value = values[key]
                series[key].append(None if value is None else round(value, 4))
        self._previous, self._previous_at = now, now_at

    def series(self, name: str) -> dict[str, list[Any]]:
        """The engine's points, oldest first: ``t`` (unix seconds) and one list per series."""
        found = self._series.get(name)
        if found is None:
            return {key: [] for key in ("t", *SERIES)}
        return {key: list(values) for key, values in found.items()}

    def latest(self, name: str) -> dict[str, Any]:
        """The engine's newest point (None values before the first sample)."""
        found = self._series.get(name)
        if not found or not found["t"]:
            return {key: None for key in SERIES}
        return {key: found[key][-1] for key in SERIES}
