"""Dynamic batching: concurrent requests share engine runs.

One ``DynamicBatcher`` per loaded engine version. Requests wait in bounded FIFO
queues, one per priority level (1 is the highest), each with a future and a
deadline. ``instances`` worker coroutines each take the oldest request of the
highest non-empty level, gather later requests whose non-batch dimensions match
(up to ``max_batch_size`` rows, higher levels first), and hand the batch to an
instance thread, which concatenates it, runs it and splits the outputs back, so
the event loop never blocks on inference and the next batch forms while the
current one computes.

A batch closes when it holds ``max_batch_size`` rows, when its rows reach one of
the ``preferred_batch_sizes``, when its oldest request has waited
``max_queue_delay_ms``, or when one more request would make the batch run past a
member's deadline. With a delay of 0 a worker never waits for more requests: it
runs what is queued, and batches grow on their own while a run is under way.

With a ``latency_target_ms`` the batcher is adaptive: it fits the engine's
measured latency per batch size as a line, tracks the arrival rate, and picks
the delay and batch cap that keep fill time plus run time within the target
(``adaptive_plan``); the chosen delay is exported as a metric.

Overload (``service.admission``): a request is queued only if admission predicts
it can finish before its deadline; a full queue makes room by shedding the newest
request of a lower level, or refuses. Work that can no longer finish in time
(deadline passed, or too close for its own run; or over the wait budget of a
standing queue) is dropped when a batch forms, before it runs. Refusals are
``service.refusals`` errors carrying the backlog's drain time.

A request of more rows than ``max_batch_size`` (up to ``max_request_rows``) is
queued as engine-sized parts that batch like any request; it is answered once,
when all have run, or with the first part's error.

``swap`` replaces the engine while requests flow: batches formed from then on
run on the new engine (queued requests included), batches already running finish
on the old one, and ``swap`` returns once the last of them has, so the caller can
close the old engine. Intake never pauses, so no request fails or waits longer
than one batch because of a swap.

A batch of several requests that fails is run again one request at a time (once
each, on the same thread), so each request gets its own answer: one request with
a bad value fails alone. A request whose client went away is dropped from the
queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from engines.errors import DeviceLost
from service import tracing
from service.admission import Admission, LatencyModel, QueuePolicy, fit_batch_cost
from service.device_lost import device_lost
from service.refusals import DeadlinePassed, QueueFull, QueueTimeout, Refused, Shed, Stopping

log = logging.getLogger("kiln.batching")

RunBatch = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
Outcome = dict[str, np.ndarray] | Exception


@dataclass(frozen=True)
class BatchingConfig:
    """Per-engine batching settings (given at upload, defaults from server settings)."""

    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    timeout_ms: float = 30_000.0
    instances: int = 1
    latency_target_ms: float | None = None
    priority_levels: int = 2
    default_priority_level: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchingConfig:
        values = dict(data)
        values["preferred_batch_sizes"] = tuple(values.get("preferred_batch_sizes", ()))
        return cls(**values)


def adaptive_plan(
    fixed_ms: float, per_row_ms: float, arrivals_per_s: float, target_ms: float, max_batch: int
) -> tuple[float, int]:
    """The queue delay (seconds) and batch cap that keep a request's expected time in
    server (waiting for the batch to fill, then running it) within ``target_ms``.

    The largest batch whose fill time ``(b - 1) / rate`` plus its run time fits the
    target wins; the delay is that fill time, so a lone request never waits longer
    than the target leaves after its own run."""
    best_cap, best_delay = 1, 0.0
    if arrivals_per_s <= 0:
        return 0.0, max_batch
    for batch in range(1, max_batch + 1):
        run_ms = fixed_ms + per_row_ms * batch
        fill_ms = 1000.0 * (batch - 1) / arrivals_per_s
        if run_ms + fill_ms <= target_ms:
            best_cap, best_delay = batch, fill_ms / 1000.0
    return best_delay, best_cap


class BatchObserver(Protocol):
    """What the batcher reports (the service's metrics implement it)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch_done(self, rows: int, requests: int, compute_s: float, queue_waits_s: list[float]) -> None: ...

    def adapted(self, delay_s: float, batch_cap: int) -> None: ...

    def reran(self, requests: int) -> None: ...

    def load_ratio_from(self, read: Callable[[], float]) -> None: ...


class BatchError(RuntimeError):
    """The engine's outputs cannot be split back into the batch's requests."""


_QUEUED, _RUNNING, _DONE = 0, 1, 2

DISCONNECT_CHECK_AFTER_S = 0.05
ADAPTIVE_SMOOTHING = 0.02
ADAPTIVE_REPLAN_S = 0.1
SHED_CHECKS = 4  # queued lower-priority requests re-checked per higher-priority arrival
BIG_OUTPUT_BYTES = 1 << 20  # joining a split request's outputs past this size goes to a thread


class _Split:
    """A request queued as several engine-sized parts: its outputs, as they come."""

    __slots__ = ("future", "outputs", "parts", "remaining")

    def __init__(self, future: asyncio.Future[dict[str, np.ndarray]], count: int) -> None:
        self.future = future
        self.outputs: list[dict[str, np.ndarray] | None] = [None] * count
        self.remaining = count
        self.parts: list[_Pending] = []


class _Pending:
    __slots__ = (
        "deadline",
        "enqueued",
        "explicit",
        "feeds",
        "first",
        "future",
        "index",
        "key",
        "last",
        "level",
        "predicted",
        "rows",
        "split",
        "state",
        "timer",
        "trace",
    )

    def __init__(
        self,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        key: tuple[Any, ...],
        level: int,
        future: asyncio.Future[dict[str, np.ndarray]] | None,
        deadline: float,
        enqueued: float,
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.level = level
        self.future = future  # None for the parts of a split request (they report to ``split``)
        self.deadline = deadline
        self.enqueued = enqueued
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.trace = tracing.current_context()  # None unless tracing is on
        self.split: _Split | None = None
        self.index = 0
        self.first = True  # the request's first part: its queue wait is the request's
        self.last = True  # the request's last part still queued
        self.predicted = 0.0  # when admission expected it to be answered
        self.explicit = False  # the client gave the deadline (else the engine's timeout did)


def run_parts(
    run: RunBatch, parts: list[Mapping[str, np.ndarray]], rows: list[int]
) -> tuple[list[Outcome], bool]:
    """Run a batch on an instance thread: concatenate the parts, run them once and
    split the outputs back. If a batch of several fails, run each part alone so that
    each gets its own answer. Returns the outcomes and whether it ran them one by one.
    ``DeviceLost`` propagates: nothing more can run."""
    if len(parts) == 1:
        try:
            return [run(parts[0])], False
        except DeviceLost:
            raise
        except Exception as exc:
            return [exc], False
    try:
        feeds = {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}
        return list(_split(run(feeds), rows)), False
    except DeviceLost:
        raise
    except Exception:
        outcomes: list[Outcome] = []
        for part in parts:
            try:
                outcomes.append(run(part))
            except DeviceLost:
                raise
            except Exception as exc:
                outcomes.append(exc)
        return outcomes, True


def _split(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise BatchError(
                f"output '{name}' has {array.shape[0] if array.ndim else 0} rows for a batch "
                f"of {total}; the engine does not keep the batch axis"
            )
    results = []
    offset = 0
    for count in rows:
        results.append({name: array[offset : offset + count] for name, array in outputs.items()})
        offset += count
    return results


def _join(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in outputs], axis=0) for name in outputs[0]}


class InferenceThread:
    """One instance's worker thread. Lighter than a ThreadPoolExecutor on the hot
    path: one C-level queue put to hand a batch over, one ``call_soon_threadsafe``
    to hand the outcome back."""

    def __init__(self, name: str, *, nice: int = 0) -> None:
        self.nice = nice
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, function, args))
        return future

    def _run(self) -> None:
        if self.nice:
            # Linux schedules threads on their own: a lower priority for this one lets the
            # event loop (answers, refusals, health checks) go first on a shared core.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, function, args = job
            try:
                result, error = function(*args), None
            except BaseException as exc:
                result, error = None, exc
            # RuntimeError: the loop closed while this batch ran, and nobody waits for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)

    def stop(self) -> None:
        """Let the thread finish its current batch and exit (does not wait)."""
        self._jobs.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DynamicBatcher:
    """Forms batches from concurrent ``infer`` calls and runs them with ``run_batch``.

    ``run_batch`` is called on one of ``instances`` worker threads and must be
    thread-safe (``Runner.infer`` is). For unbatchable engines every request runs
    alone. All public coroutines run on the event loop that called ``start``.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatchingConfig,
        *,
        batchable: bool,
        observer: BatchObserver | None = None,
        name: str = "engine",
        latency_profile_ms: Mapping[int, float] | None = None,
        policy: QueuePolicy | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.config = config
        self.batchable = batchable
        self.observer = observer
        self.name = name
        self.policy = policy or QueuePolicy()
        self.batches_run = 0
        self.requests_run = 0
        self.admission = Admission(
            max_batch_size=config.max_batch_size if batchable else 1,
            instances=config.instances,
            priority_levels=config.priority_levels,
            default_priority_level=config.default_priority_level,
            policy=self.policy,
            latency_profile_ms=latency_profile_ms,
            now=time.monotonic(),
        )
        self.levels = self.admission.levels
        self._queues: list[deque[_Pending]] = [deque() for _ in range(self.levels + 1)]  # index 0 unused
        self._depth = 0
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._threads: list[InferenceThread] = []
        # Engine generation: bumped by each swap; running batches counted per generation
        # (a generation with none running has no entry).
        self._generation = 0
        self._running_by_generation: dict[int, int] = {}
        self._batch_ended = asyncio.Event()
        self._accepting = False
        self._preferred = sorted(set(config.preferred_batch_sizes))
        self._delay_s = config.max_queue_delay_ms / 1000.0
        self._cap = config.max_batch_size
        # Adaptive mode: with a latency target, delay and cap follow the arrival rate.
        self._adaptive = config.latency_target_ms is not None and batchable
        self._cost = fit_batch_cost(latency_profile_ms or {})
        self._arrival_rate = 0.0
        self._last_arrival = 0.0
        self._next_plan_at = 0.0
        if self._adaptive:
            self._delay_s = 0.0  # the target replaces max_queue_delay_ms
        self.admission.delay_s = self._delay_s

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per instance; if one cannot start (thread or memory
        limits), those that did are stopped and the error is raised."""
        threads: list[InferenceThread] = []
        try:
            for i in range(self.config.instances):
                threads.append(
                    InferenceThread(f"kiln-infer-{self.name}-{i}", nice=self.policy.inference_nice)
                )
        except BaseException:
            for thread in threads:
                thread.stop()
            raise
        self._accepting = True
        self._threads = threads
        self._workers = [
            asyncio.create_task(self._worker(thread), name=f"batcher-{self.name}-{i}")
            for i, thread in enumerate(self._threads)
        ]
        if self.observer is not None:
            self.observer.load_ratio_from(self.load_ratio)

    @property
    def queue_depth(self) -> int:
        """Requests queued (a request bigger than a batch counts once)."""
        return self.admission.queued_requests

    @property
    def busy(self) -> bool:
        return bool(self._depth) or bool(self._running_by_generation)

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop intake; let queued and running batches finish for up to
        ``drain_timeout_s``; then fail what is left with ``Stopping``."""
        self._accepting = False
        self._wakeup.set()
        deadline = time.monotonic() + drain_timeout_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for level_queue in self._queues:
            for pending in list(level_queue):
                self._drop(pending, Stopping("the engine was unloaded before this request ran"))
        self._report_depth()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        for thread in self._threads:
            thread.stop()  # a batch still running finishes on its own; nobody waits for it
        self._threads = []

    async def swap(
        self, run_batch: RunBatch, *, latency_profile_ms: Mapping[int, float] | None = None
    ) -> None:
        """Run every batch formed from now on with ``run_batch``; return once the
        batches that started on the previous engine have finished, after which
        nothing calls it again. ``latency_profile_ms`` is the new engine's profile
        (for the adaptive plan and admission's predictions)."""
        self.run_batch = run_batch
        if latency_profile_ms is not None:
            self._cost = fit_batch_cost(latency_profile_ms)
            self._next_plan_at = 0.0  # re-plan at the next arrival
            self.admission.latency = LatencyModel(latency_profile_ms)
        self._generation += 1
        generation = self._generation
        while any(g < generation for g in self._running_by_generation):
            self._batch_ended.clear()
            await self._batch_ended.wait()

    # -- intake ----------------------------------------------------------------

    def precheck(
        self, *, priority: int | None = None, timeout_ms: float | None = None, header_read: bool = False
    ) -> None:
        """Refuse now what ``infer`` would refuse: routes call it before reading (or
        decoding) a body, so that refusals under overload stay cheap. Before the
        request's header is read (``header_read`` False) it assumes the best case:
        the highest level, the engine's longest timeout, given by the client; after,
        ``priority`` and ``timeout_ms`` are the request's own."""
        now = time.monotonic()
        level = self.admission.level_of(priority) if header_read else 1
        explicit = timeout_ms is not None or not header_read
        try:
            self._check_open(level)
            self.admission.check(
                level, 1, now + self._timeout_s(timeout_ms), now, explicit=explicit, count=False
            )
        except Refused:
            self.admission.refused_early(1, now)
            raise

    def _check_open(self, level: int) -> None:
        if not self._accepting:
            raise Stopping("the server is not accepting requests for this engine")
        queued = self.admission.queued_requests
        if queued >= self.config.max_queue_size and not self._lower_queued(level):
            raise QueueFull(
                f"engine '{self.name}' has {queued} requests queued, its limit",
                retry_after_s=self.admission.drain_s(level, time.monotonic()),
            )

    def _lower_queued(self, level: int) -> bool:
        return any(self._queues[lower] for lower in range(level + 1, self.levels + 1))

    def _timeout_s(self, timeout_ms: float | None) -> float:
        timeout_s = self.config.timeout_ms / 1000.0
        if timeout_ms is not None:
            timeout_s = min(timeout_s, max(timeout_ms, 0.0) / 1000.0)
        return timeout_s

    async def infer(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        timeout_ms: float | None = None,
        priority: int | None = None,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue one request (one or more rows) and wait for its outputs.

        ``feeds`` must have passed ``Runner.check_feeds`` (the one place where
        names, dtypes, shapes and the row range are checked). ``priority`` is
        Triton's (1 the highest; 0 or None the default level). Raises a
        ``Refused`` (not queued, or dropped for overload), ``DeadlinePassed`` (the
        deadline passed, or would before its run ended, so it never ran), or what
        the engine raised for this request. ``disconnected``, when given, is awaited
        once the request has waited a little: if it returns first, the request is
        dropped from the queue and ``asyncio.CancelledError`` is raised.
        """
        now = time.monotonic()
        level = self.admission.level_of(priority)
        rows, key = self._rows_and_key(feeds)
        timeout_s = self._timeout_s(timeout_ms)
        deadline = now + timeout_s
        try:
            self._check_open(level)
        except Refused:
            self.admission.refused_early(rows, now)
            raise
        predicted = self.admission.check(level, rows, deadline, now, explicit=timeout_ms is not None)
        if self.admission.queued_requests >= self.config.max_queue_size:
            self._shed_newest_below(level)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        parts = self._enqueue(feeds, rows, key, level, future, deadline, now, loop, timeout_s)
        parts[0].predicted = predicted
        parts[0].explicit = timeout_ms is not None
        self.admission.queued(level, rows)
        self._report_depth()
        if level < self.levels and self._lower_queued(level):
            self._shed_late_below(level, now)
        if self._adaptive:
            self._observe_arrival(now)
        self._wakeup.set()
        watch: asyncio.TimerHandle | None = None
        watcher: asyncio.Future[Any] | None = None
        if disconnected is not None:
            # Most requests finish within milliseconds: only those still waiting
            # after DISCONNECT_CHECK_AFTER_S get a task that watches their client.
            def start_watching() -> None:
                nonlocal watcher
                if not future.done():
                    watcher = asyncio.ensure_future(disconnected())
                    watcher.add_done_callback(lambda w: None if w.cancelled() else self._abandon(parts))

            watch = loop.call_later(DISCONNECT_CHECK_AFTER_S, start_watching)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(parts)
            raise
        finally:
            if watch is not None:
                watch.cancel()
            if watcher is not None:
                watcher.cancel()

    def _enqueue(
        self,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        key: tuple[Any, ...],
        level: int,
        future: asyncio.Future[dict[str, np.ndarray]],
        deadline: float,
        now: float,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
    ) -> list[_Pending]:
        limit = self.config.max_batch_size
        if rows <= limit or not self.batchable:
            pending = _Pending(feeds, rows, key, level, future, deadline, now)
            pending.timer = loop.call_later(timeout_s, self._expire, pending)
            self._queues[level].append(pending)
            self._depth += 1
            return [pending]
        # Bigger than the engine's batch: engine-sized parts (views, not copies).
        starts = range(0, rows, limit)
        split = _Split(future, len(starts))
        for index, start in enumerate(starts):
            part_feeds = {name: array[start : start + limit] for name, array in feeds.items()}
            part = _Pending(part_feeds, min(limit, rows - start), key, level, None, deadline, now)
            part.split, part.index = split, index
            part.first, part.last = index == 0, index == len(starts) - 1
            split.parts.append(part)
        split.parts[0].timer = loop.call_later(timeout_s, self._expire, split.parts[0])
        self._queues[level].extend(split.parts)
        self._depth += len(split.parts)
        return split.parts

    def _shed_newest_below(self, level: int) -> None:
        """The queue is full: drop the newest request of the lowest level below ``level``."""
        for lower in range(self.levels, level, -1):
            if self._queues[lower]:
                victim = self._queues[lower][-1]
                self._drop(
                    victim,
                    Shed(
                        "the queue was full and this request was dropped for higher-priority work",
                        retry_after_s=self.admission.drain_s(lower, time.monotonic()),
                    ),
                )
                return

    def _shed_late_below(self, level: int, now: float) -> None:
        """Higher-priority work just arrived ahead of the lower levels: drop their
        newest requests that can no longer finish before their deadlines."""
        checks = SHED_CHECKS
        for lower in range(self.levels, level, -1):
            while self._queues[lower] and checks:
                checks -= 1
                victim = self._queues[lower][-1]
                _, done, _ = self.admission.predict(lower, 0, now)
                if now + done <= victim.deadline:
                    break
                self._drop(
                    victim,
                    Shed(
                        "higher-priority work arrived and this request could no longer finish in time",
                        retry_after_s=self.admission.drain_s(lower, now),
                    ),
                )

    def _observe_arrival(self, now: float) -> None:
        """Track the arrival rate (an exponential moving average over about 50
        arrivals) and re-plan the delay and cap at most every 100 ms."""
        if self._last_arrival:
            gap = max(now - self._last_arrival, 1e-6)
            self._arrival_rate += (1.0 / gap - self._arrival_rate) * ADAPTIVE_SMOOTHING
        self._last_arrival = now
        if now < self._next_plan_at:
            return
        self._next_plan_at = now + ADAPTIVE_REPLAN_S
        assert self.config.latency_target_ms is not None
        self._delay_s, self._cap = adaptive_plan(
            *self._cost, self._arrival_rate, self.config.latency_target_ms, self.config.max_batch_size
        )
        self.admission.delay_s = self._delay_s
        if self.observer is not None:
            self.observer.adapted(self._delay_s, self._cap)

    @property
    def plan(self) -> tuple[float, int]:
        """The current queue delay (seconds) and batch cap."""
        return self._delay_s, self._cap

    def load_ratio(self) -> float:
        return self.admission.load_ratio(time.monotonic())

    def _rows_and_key(self, feeds: Mapping[str, np.ndarray]) -> tuple[int, tuple[Any, ...]]:
        if not self.batchable:
            return 1, ()
        # The feeds were checked (Runner.check_feeds): at least one row, one batch size.
        arrays = list(feeds.values())
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        if len(feeds) == 1:
            ((name, array),) = feeds.items()
            key: tuple[Any, ...] = ((name, array.shape[1:]),)
        else:
            key = tuple((name, array.shape[1:]) for name, array in sorted(feeds.items()))
        return rows, key

    # -- leaving the queue -------------------------------------------------------

    def _remove(self, pending: _Pending, now: float) -> None:
        """Take a queued part out of its queue and out of admission's count."""
        with contextlib.suppress(ValueError):
            self._queues[pending.level].remove(pending)
            self._depth -= 1
        self._left_queue(pending, now)

    def _left_queue(self, pending: _Pending, now: float) -> None:
        pending.state = _RUNNING
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        self.admission.left_queue(
            pending.level, pending.rows, last_part=pending.last, waited=now - pending.enqueued, now=now
        )

    def _drop(self, pending: _Pending, error: Exception) -> None:
        """Answer a queued request with ``error`` without running it (every queued
        part of a split request goes with it)."""
        now = time.monotonic()
        for part in pending.split.parts if pending.split is not None else [pending]:
            if part.state == _QUEUED:
                self._remove(part, now)
            part.state = _DONE
        self._report_depth()
        self._fail(pending, error)

    def _abandon(self, parts: list[_Pending]) -> None:
        """The caller is gone: drop what has not started."""
        now = time.monotonic()
        for part in parts:
            if part.state == _QUEUED:
                self._remove(part, now)
            part.state = _DONE
        self._report_depth()
        future = parts[0].future if parts[0].split is None else parts[0].split.future
        if future is not None and not future.done():
            future.cancel()

    def _expire(self, pending: _Pending) -> None:
        if pending.state != _QUEUED:
            return
        waited = time.monotonic() - pending.enqueued
        self._drop(
            pending,
            DeadlinePassed(
                f"the request waited {1000 * waited:.0f} ms in the queue and its deadline passed "
                "before it could run"
            ),
        )

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        future = pending.future if pending.split is None else pending.split.future
        if future is not None and not future.done():
            future.set_exception(error)

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(self.admission.queued_requests)

    # -- batch formation -------------------------------------------------------

    async def _worker(self, thread: InferenceThread) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            await self._execute(batch, thread)

    def _oldest(self) -> _Pending | None:
        for level_queue in self._queues:
            if level_queue:
                return level_queue[0]
        return None

    async def _next_batch(self) -> list[_Pending] | None:
        while True:
            oldest = self._oldest()
            if oldest is None:
                if not self._accepting:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self.batchable:
                now = time.monotonic()
                if self._late(oldest, oldest.rows, now):
                    continue
                self._queues[oldest.level].popleft()
                self._depth -= 1
                self._left_queue(oldest, now)
                self._report_depth()
                return [oldest]
            selected, rows, cut, closed = self._gather(oldest.key)
            if not selected:
                continue  # everything it looked at was dropped
            waited = time.monotonic() - selected[0].enqueued
            if (
                closed
                or cut is not None
                or rows >= self._cap
                or waited >= self._delay_s
                or not self._accepting
            ):
                chosen = selected if cut is None else selected[:cut]
                self._take(chosen)
                return chosen
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._delay_s - waited)

    def _late(self, pending: _Pending, rows: int, now: float) -> bool:
        """Drop ``pending`` if it can no longer finish in time: its deadline would pass
        before a run of ``rows`` ends, or it waited past a standing queue's budget."""
        run_s = self.admission.latency.cost(rows)
        if now + run_s > pending.deadline:
            self._drop(
                pending,
                DeadlinePassed(
                    f"the request waited {1000 * (now - pending.enqueued):.0f} ms in the queue; its "
                    f"run (about {1000 * run_s:.0f} ms) would end after its deadline, so it was not run"
                ),
            )
            return True
        budget = self.admission.queue_timeout(now)
        if budget is not None and now - pending.enqueued > budget and pending.first and not pending.explicit:
            # A client's own deadline is kept by admission and the checks above; the
            # standing-queue budget drops queued work only where there is none.
            self._drop(
                pending,
                QueueTimeout(
                    f"the request waited {1000 * (now - pending.enqueued):.0f} ms in a standing queue, "
                    f"over its {1000 * budget:.0f} ms budget",
                    retry_after_s=self.admission.drain_s(pending.level, now),
                ),
            )
            return True
        return False

    def _gather(self, key: tuple[Any, ...]) -> tuple[list[_Pending], int, int | None, bool]:
        """Queued requests with this key, higher levels first and FIFO within a level,
        that fit one batch; their row count; when a preferred size is reached, how
        many of them make it; and whether the batch is closed because one more
        request would make it end after a member's deadline. Requests that can no
        longer finish in time are dropped on the way."""
        now = time.monotonic()
        latency = self.admission.latency
        selected: list[_Pending] = []
        rows = 0
        cut = None
        limit = self._cap
        earliest = math.inf
        for level_queue in self._queues:
            if not level_queue:
                continue
            for pending in list(level_queue):
                if pending.key != key:
                    continue
                if selected and rows + pending.rows > limit:
                    return selected, rows, cut, True
                if self._late(pending, pending.rows, now):
                    continue
                if selected and now + latency.cost(rows + pending.rows) > min(earliest, pending.deadline):
                    return selected, rows, cut, True
                selected.append(pending)
                rows += pending.rows
                earliest = min(earliest, pending.deadline)
                if rows in self._preferred:
                    cut = len(selected)
                if rows == limit:
                    return selected, rows, cut, False
        return selected, rows, cut, False

    def _take(self, chosen: list[_Pending]) -> None:
        now = time.monotonic()
        first = chosen[0]
        level_queue = self._queues[first.level]
        if len(chosen) == 1 and level_queue and level_queue[0] is first:
            level_queue.popleft()
        else:
            ids = {id(p) for p in chosen}
            for level in {p.level for p in chosen}:
                self._queues[level] = deque(p for p in self._queues[level] if id(p) not in ids)
        self._depth -= len(chosen)
        for pending in chosen:
            self._left_queue(pending, now)
        self._report_depth()

    # -- execution ---------------------------------------------------------------

    async def _execute(self, batch: list[_Pending], thread: InferenceThread) -> None:
        started = time.monotonic()
        waits = [started - p.enqueued for p in batch if p.first]
        counts = [p.rows for p in batch]
        rows = sum(counts)
        by_level: dict[int, int] = {}
        for pending in batch:
            by_level[pending.level] = by_level.get(pending.level, 0) + pending.rows
        token = self.admission.started(by_level, rows, started)
        # The engine is chosen when the batch starts: a swap from now on does not move it.
        generation, run_batch = self._generation, self.run_batch
        self._running_by_generation[generation] = self._running_by_generation.get(generation, 0) + 1
        outcomes: list[Outcome] = []
        reran = False
        try:
            outcomes, reran = await thread.submit(run_parts, run_batch, [p.feeds for p in batch], counts)
        except asyncio.CancelledError:
            # The batcher is stopping: answer this batch's requests, then stop.
            for pending in batch:
                self._fail(pending, Stopping("the engine was unloaded while this request ran"))
            raise
        except DeviceLost as exc:
            outcomes = [exc] * len(batch)
            device_lost(exc)
        except Exception as exc:  # run_parts answers the engine's errors; this is kiln's own
            log.exception("batch of %d requests on %s failed", len(batch), self.name)
            outcomes = [exc] * len(batch)
        finally:
            compute_s = time.monotonic() - started
            measured = not reran and any(not isinstance(o, Exception) for o in outcomes)
            self.admission.finished(token, rows, compute_s if measured else None)
            left = self._running_by_generation[generation] - 1
            if left:
                self._running_by_generation[generation] = left
            else:
                del self._running_by_generation[generation]
                self._batch_ended.set()
            self.batches_run += 1
            self.requests_run += len(batch)
        if reran:
            log.debug("a batch of %d requests on %s failed; ran them one by one", len(batch), self.name)
            if self.observer is not None:
                self.observer.reran(len(batch))
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.state = _DONE
            if isinstance(outcome, Exception):
                self._fail_part(pending, outcome)
            else:
                self._answer(pending, outcome)
        if all(isinstance(o, Exception) for o in outcomes):
            return
        if self.observer is not None:
            requests = sum(1 for p in batch if p.split is None or p.first)
            self.observer.batch_done(rows, requests, compute_s, waits)
        if tracing.enabled():
            tracing.record_batch([p.trace for p in batch], waits, compute_s, rows, self.name)

    def _fail_part(self, pending: _Pending, error: Exception) -> None:
        if pending.split is not None:
            self._drop(pending, error)  # the rest of the request will not be needed
        else:
            self._fail(pending, error)

    def _answer(self, pending: _Pending, outputs: dict[str, np.ndarray]) -> None:
        split = pending.split
        if split is None:
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(outputs)
                self.admission.finished_request(pending.predicted, time.monotonic())
            return
        if split.future.done():
            return
        split.outputs[pending.index] = outputs
        split.remaining -= 1
        if split.remaining == 0:
            parts = [p for p in split.outputs if p is not None]
            size = sum(array.nbytes for part in parts for array in part.values())
            if size > BIG_OUTPUT_BYTES:
                task = asyncio.ensure_future(asyncio.to_thread(_join, parts))
                task.add_done_callback(lambda done: _settle_from(split.future, done))
            else:
                split.future.set_result(_join(parts))


def _settle_from(future: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif done.exception() is not None:
        future.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        future.set_result(done.result())
