"""Admission: whether a request may join an engine's queue, decided from when it
would finish.

The batcher asks before it queues anything. Admission keeps what a prediction
needs, per engine version: the rows queued at each priority level, the batches
running and when they should end, and the engine's batch latency (the build
profile's line, corrected by every batch that runs: ``LatencyModel``). A request
whose predicted completion falls after its deadline is refused at once, before
it costs a decode (``DeadlineUnmeetable``), rather than queued to expire.

Queue timeouts follow CoDel's idea (Nichols and Jacobson; as used for RPC
queues in "Fail at Scale", ACM Queue 13(8)): while the queue drains now and then
a request may wait up to its deadline; once it has not drained (no request left
it within ``target`` of waiting, and it was never empty) for a whole
``interval``, it is a standing queue, and the wait budget shrinks to ``target``
until it drains again (``QueueTimeout``). ``target`` defaults to one full
batch's run time (at least 5 ms): enough queued work to keep the engine busy.

Priorities follow Triton's: level 1 is the highest; 0, no value or a value past
the engine's levels mean the default level. A request's prediction counts only
the rows queued at its level or higher, stretched by the share of the engine
that higher levels are taking; the batcher serves higher levels first and sheds
queued lower-priority requests that can no longer meet their deadlines.

Demand (rows arriving per second, admitted or not) over capacity (rows per
second at full batches on every instance) is the engine's load ratio, exported
as ``kiln_engine_load_ratio`` for autoscaling.

Nothing here knows HTTP or the event loop: every method takes ``now`` (monotonic
seconds) and refusals are ``service.refusals`` errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from service.refusals import DeadlineUnmeetable, QueueTimeout

MIN_TARGET_S = 0.005
DEMAND_WINDOW_S = 10.0
SHARE_WINDOW_S = 2.0
LATENCY_SMOOTHING = 0.1
MAX_STRETCH = 5.0
LATENESS_SMOOTHING = 0.02


@dataclass(frozen=True)
class QueuePolicy:
    """The server's overload settings (``KILN_ADMISSION``, ``KILN_QUEUE_TARGET_MS``,
    ``KILN_QUEUE_INTERVAL_MS``, ``KILN_MAX_REQUEST_ROWS``), the same for every engine."""

    admission: bool = True
    queue_target_ms: float | None = None  # None: one full batch's run time; 0: no queue timeouts
    queue_interval_ms: float = 100.0
    max_request_rows: int = 65_536
    inference_nice: int = 10  # instance threads yield the CPU to the event loop (0: same priority)


def fit_batch_cost(latency_ms: Mapping[int, float]) -> tuple[float, float]:
    """Least-squares line ``cost(b) = fixed + per_row * b`` (ms) through a profile of
    batch size → latency; one point gives a line through the origin."""
    points = sorted((int(b), float(ms)) for b, ms in latency_ms.items())
    if not points:
        return 0.0, 0.0
    if len(points) == 1:
        b, ms = points[0]
        return 0.0, ms / b
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_ms = sum(ms for _, ms in points) / n
    spread = sum((b - mean_b) ** 2 for b, _ in points)
    per_row = max(sum((b - mean_b) * (ms - mean_ms) for b, ms in points) / spread, 0.0)
    fixed = mean_ms - per_row * mean_b
    if fixed < 0:  # a line through the origin instead
        return 0.0, sum(b * ms for b, ms in points) / sum(b * b for b, _ in points)
    return fixed, per_row


class LatencyModel:
    """Predicted run time of a batch: a line through the latency per batch size. The
    build profile seeds it; each batch that runs replaces (then smooths) the point
    of its size, and scales the profile's other points by how the live runs compare
    with the profile, so a profile measured on a busier (or idler) machine is
    corrected even at batch sizes that do not run yet."""

    def __init__(self, profile_ms: Mapping[int, float] | None = None) -> None:
        self._profile_ms: dict[int, float] = {int(b): float(ms) for b, ms in (profile_ms or {}).items()}
        self._profile_line = fit_batch_cost(self._profile_ms)
        self._live_ms: dict[int, float] = {}
        self._ratio: float | None = None  # live runs over the profile's line
        self._since_fit = 0
        self.fixed_s = 0.0
        self.per_row_s = 0.0
        self._fit()

    def _fit(self) -> None:
        ratio = self._ratio or 1.0
        points = {b: ms * ratio for b, ms in self._profile_ms.items()}
        points.update(self._live_ms)
        fixed_ms, per_row_ms = fit_batch_cost(points)
        self.fixed_s, self.per_row_s = fixed_ms / 1000, per_row_ms / 1000
        self._since_fit = 0

    @property
    def known(self) -> bool:
        return bool(self._profile_ms or self._live_ms)

    def cost(self, rows: int) -> float:
        """Seconds to run a batch of ``rows`` (0 while nothing is known)."""
        return self.fixed_s + self.per_row_s * rows

    def observe(self, rows: int, seconds: float) -> None:
        ms = seconds * 1000
        fixed_ms, per_row_ms = self._profile_line
        expected = fixed_ms + per_row_ms * rows
        if expected > 0:
            ratio = ms / expected
            previous = self._ratio
            self._ratio = ratio if previous is None else previous + (ratio - previous) * LATENCY_SMOOTHING
        if rows in self._live_ms:
            self._live_ms[rows] += (ms - self._live_ms[rows]) * LATENCY_SMOOTHING
            self._since_fit += 1
            if self._since_fit >= 16:
                self._fit()
        else:  # the first live run at this size replaces the build profile's point
            self._live_ms[rows] = ms
            self._fit()


class RateMeter:
    """Events per second, exponentially weighted over about ``window_s`` seconds."""

    __slots__ = ("_at", "_value", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._value = 0.0
        self._at = 0.0

    def add(self, count: float, now: float) -> None:
        if self._value:
            self._value *= math.exp(-(now - self._at) / self.window_s)
        self._value += count / self.window_s
        self._at = now

    def rate(self, now: float) -> float:
        if not self._value:
            return 0.0
        return self._value * math.exp(-max(now - self._at, 0.0) / self.window_s)


class Admission:
    """One engine version's admission state; the batcher calls it on every arrival,
    dequeue and batch. ``instances`` batches may run at once, of up to
    ``max_batch_size`` rows."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        instances: int,
        priority_levels: int,
        default_priority_level: int,
        policy: QueuePolicy,
        latency_profile_ms: Mapping[int, float] | None = None,
        now: float = 0.0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.instances = max(1, instances)
        self.levels = max(1, priority_levels)
        self.default_level = min(max(1, default_priority_level), self.levels)
        self.policy = policy
        self.latency = LatencyModel(latency_profile_ms)
        self.delay_s = 0.0  # the batcher's wait for a batch to fill: never a standing queue
        self.queued_rows = [0] * (self.levels + 1)  # by level; index 0 unused
        self.queued_requests = 0
        self._running: dict[int, float] = {}  # batch token -> predicted end
        self._tokens = 0
        self._drained_at = now
        self._demand = RateMeter(DEMAND_WINDOW_S)
        self._taken = [RateMeter(SHARE_WINDOW_S) for _ in range(self.levels + 1)]
        self._lateness = 0.0
        self._lateness_spread = 0.0

    # -- levels -------------------------------------------------------------------

    def level_of(self, priority: int | None) -> int:
        """Triton's rule: 0, None or a value past the levels → the default level."""
        if not priority or priority > self.levels:
            return self.default_level
        return priority

    # -- predictions ----------------------------------------------------------------

    def capacity(self) -> float:
        """Rows per second at full batches on every instance (inf while unknown)."""
        full = self.latency.cost(self.max_batch_size)
        return self.instances * self.max_batch_size / full if full > 0 else math.inf

    def _free_in(self, now: float) -> float:
        if len(self._running) < self.instances:
            return 0.0
        return max(0.0, min(self._running.values()) - now)

    def _stretch(self, level: int, now: float) -> float:
        """How much longer work at ``level`` takes because higher levels go first."""
        if level == 1:
            return 1.0
        capacity = self.capacity()
        if math.isinf(capacity):
            return 1.0
        higher = sum(self._taken[above].rate(now) for above in range(1, level)) / capacity
        return 1.0 / max(1.0 / MAX_STRETCH, 1.0 - higher)

    def predict(self, level: int, rows: int, now: float) -> tuple[float, float, int]:
        """(seconds until its first batch starts, seconds until its last batch ends,
        rows queued ahead of it) for a request of ``rows`` at ``level`` arriving now."""
        ahead = sum(self.queued_rows[1 : level + 1])
        batch = self.max_batch_size
        full = self.latency.cost(batch)
        free_in = self._free_in(now)
        batches_before = ahead // batch
        wait = free_in + (batches_before // self.instances) * full
        total = max(ahead + rows, 1)
        batches = -(-total // batch)
        rounds = -(-batches // self.instances)
        last_rows = min(batch, total - (batches - 1) * batch)
        done = free_in + (rounds - 1) * full + self.latency.cost(last_rows)
        stretch = self._stretch(level, now)
        return wait * stretch, done * stretch, ahead

    def drain_s(self, level: int, now: float) -> float:
        """Seconds until the work queued at ``level`` or higher has run: what a
        refused client should wait before retrying (``Retry-After``)."""
        ahead = sum(self.queued_rows[1 : level + 1])
        capacity = self.capacity()
        drain = ahead / capacity if not math.isinf(capacity) else 0.0
        return max(0.001, (self._free_in(now) + drain) * self._stretch(level, now))

    def target_s(self) -> float | None:
        """The standing-queue wait budget, on top of the batcher's own queue delay;
        None when queue timeouts are off."""
        target_ms = self.policy.queue_target_ms
        if target_ms is not None:
            return target_ms / 1000 + self.delay_s if target_ms > 0 else None
        return max(MIN_TARGET_S, self.latency.cost(self.max_batch_size)) + self.delay_s

    def queue_timeout(self, now: float) -> float | None:
        """The wait budget now: ``target`` in a standing queue, else None (the
        request's own deadline is the only limit)."""
        if not self.policy.admission:
            return None
        target = self.target_s()
        if target is None or now - self._drained_at <= self.policy.queue_interval_ms / 1000:
            return None
        return target

    # -- decisions ------------------------------------------------------------------

    def check(
        self, level: int, rows: int, deadline: float, now: float, *, explicit: bool = True, count: bool = True
    ) -> float:
        """Raise ``QueueTimeout`` or ``DeadlineUnmeetable`` if a request of ``rows``
        at ``level`` should not be queued; work queued ahead of it is the only
        reason ever given (a request with nothing ahead is always tried).
        ``explicit``: the client gave the deadline; the standing-queue budget is for
        requests that did not (a client's deadline says what wait it accepts).
        ``count``: the request counts as demand (False for early checks of a
        request that will be checked again). Returns the predicted completion time.

        A completion counts as in time only with the predictions' recent lateness
        to spare (``slack_s``), so that a good prediction that ends up a little late
        does not make a late answer."""
        if count:
            self._demand.add(rows, now)
        if self.queued_requests == 0:
            self._drained_at = now
        wait, done, ahead = self.predict(level, rows, now)
        if not self.policy.admission or (ahead == 0 and wait == 0.0):
            return now + done
        budget = None if explicit else self.queue_timeout(now)
        if budget is not None and wait > budget:
            raise QueueTimeout(
                f"the queue has not drained for {self.policy.queue_interval_ms:g} ms; this request would "
                f"wait about {1000 * wait:.0f} ms, over the {1000 * budget:.0f} ms budget "
                "of a standing queue",
                retry_after_s=self.drain_s(level, now),
            )
        if now + done + self.slack_s() > deadline:
            raise DeadlineUnmeetable(
                f"{ahead} rows are queued ahead of this request; it would finish in about "
                f"{1000 * done:.0f} ms, after its deadline ({1000 * max(deadline - now, 0):.0f} ms from now)",
                retry_after_s=self.drain_s(level, now),
            )

        return now + done

    def slack_s(self) -> float:
        """How late admitted requests have finished against their predictions lately:
        the mean lateness plus twice its mean deviation (never negative)."""
        return max(0.0, self._lateness + 2 * self._lateness_spread)

    def finished_request(self, predicted: float, now: float) -> None:
        """A request admitted with completion ``predicted`` was answered at ``now``."""
        error = now - predicted
        self._lateness += (error - self._lateness) * LATENESS_SMOOTHING
        self._lateness_spread += (abs(error - self._lateness) - self._lateness_spread) * LATENESS_SMOOTHING

    def refused_early(self, rows: int, now: float) -> None:
        """Count a request refused before its own check (it is demand all the same)."""
        self._demand.add(rows, now)

    # -- bookkeeping --------------------------------------------------------------------

    def queued(self, level: int, rows: int) -> None:
        self.queued_rows[level] += rows
        self.queued_requests += 1

    def left_queue(self, level: int, rows: int, *, last_part: bool, waited: float, now: float) -> None:
        """Rows left the queue (to run, or dropped). A request that waited no longer
        than ``target``, or an empty queue, means the queue drains."""
        self.queued_rows[level] -= rows
        if last_part:
            self.queued_requests -= 1
        target = self.target_s()
        if self.queued_requests == 0 or target is None or waited <= target:
            self._drained_at = now

    def started(self, level_rows: Mapping[int, int], rows: int, now: float) -> int:
        """A batch of ``rows`` started (``level_rows``: its rows by level); returns its token."""
        self._tokens += 1
        self._running[self._tokens] = now + self.latency.cost(rows)
        for level, count in level_rows.items():
            self._taken[level].add(count, now)
        return self._tokens

    def finished(self, token: int, rows: int, seconds: float | None) -> None:
        """The batch ended; ``seconds`` is its run time (None when it is no
        measure of the engine: it failed, or ran its requests one by one)."""
        self._running.pop(token, None)
        if seconds is not None:
            self.latency.observe(rows, seconds)

    def load_ratio(self, now: float) -> float:
        """Demand over capacity: rows arriving per second (refused ones too) over the
        rows per second the engine runs at full batches."""
        capacity = self.capacity()
        return 0.0 if math.isinf(capacity) else self._demand.rate(now) / capacity
