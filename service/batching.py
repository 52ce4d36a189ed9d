"""Dynamic batching: concurrent requests share engine runs.

One ``DynamicBatcher`` per loaded engine version. Requests wait in a bounded
FIFO queue, each with a future and a deadline. ``instances`` worker coroutines
each take the oldest request, gather later requests whose non-batch dimensions
match (up to ``max_batch_size`` rows), and run the batch on a worker thread, so
the event loop never blocks on inference and the next batch forms while the
current one computes.

A batch closes when it holds ``max_batch_size`` rows, when its rows reach one of
the ``preferred_batch_sizes``, or when its oldest request has waited
``max_queue_delay_ms``. With a delay of 0 a worker never waits for more requests:
it runs what is queued, and batches grow on their own while a run is under way.

With a ``latency_target_ms`` the batcher is adaptive: it fits the engine's
measured latency per batch size as a line, tracks the arrival rate, and picks
the delay and batch cap that keep fill time plus run time within the target
(``adaptive_plan``); the chosen delay is exported as a metric.

``swap`` replaces the engine while requests flow: batches formed from then on
run on the new engine (queued requests included), batches already running finish
on the old one, and ``swap`` returns once the last of them has, so the caller can
close the old engine. Intake never pauses, so no request fails or waits longer
than one batch because of a swap.

A full queue rejects at once (``Unavailable``, 503 with Retry-After); a request
whose deadline passes while queued fails with ``DeadlineExceeded`` (504) and is
never run; a request whose client went away is dropped from the queue. One
failing batch fails its own requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from service.device_lost import device_lost
from service.errors import DeadlineExceeded, Unavailable

log = logging.getLogger("kiln.batching")

RunBatch = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchingConfig:
        values = dict(data)
        values["preferred_batch_sizes"] = tuple(values.get("preferred_batch_sizes", ()))
        return cls(**values)


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
    per_row = sum((b - mean_b) * (ms - mean_ms) for b, ms in points) / spread
    per_row = max(per_row, 0.0)
    return max(mean_ms - per_row * mean_b, 0.0), per_row


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

    def rejected(self, reason: str) -> None: ...

    def adapted(self, delay_s: float, batch_cap: int) -> None: ...


class BatchError(RuntimeError):
    """The engine's outputs cannot be split back into the batch's requests."""


_QUEUED, _RUNNING, _DONE = 0, 1, 2

DISCONNECT_CHECK_AFTER_S = 0.05
ADAPTIVE_SMOOTHING = 0.02
ADAPTIVE_REPLAN_S = 0.1


class _Pending:
    __slots__ = ("deadline", "enqueued", "feeds", "future", "key", "rows", "state", "timer", "trace")

    def __init__(
        self,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        key: tuple[Any, ...],
        future: asyncio.Future[dict[str, np.ndarray]],
        deadline: float,
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.future = future
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.trace = tracing.current_context()  # None unless tracing is on


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class InferenceThread:
    """One instance's worker thread. Lighter than a ThreadPoolExecutor on the hot
    path: one C-level queue put to hand a batch over, one ``call_soon_threadsafe``
    to hand the outputs back."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, run: RunBatch, feeds: Mapping[str, np.ndarray]) -> asyncio.Future[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        self._jobs.put((loop, future, run, feeds))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, run, feeds = job
            try:
                result, error = run(feeds), None
            except BaseException as exc:
                result, error = None, exc
            # RuntimeError: the loop closed while this batch ran, and nobody waits for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)

    def stop(self) -> None:
        """Let the thread finish its current batch and exit (does not wait)."""
        self._jobs.put(None)


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
    ) -> None:
        self.run_batch = run_batch
        self.config = config
        self.batchable = batchable
        self.observer = observer
        self.name = name
        self.batches_run = 0
        self.requests_run = 0
        self._queue: deque[_Pending] = deque()
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

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per instance; if one cannot start (thread or memory
        limits), those that did are stopped and the error is raised."""
        threads: list[InferenceThread] = []
        try:
            for i in range(self.config.instances):
                threads.append(InferenceThread(f"kiln-infer-{self.name}-{i}"))
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

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or bool(self._running_by_generation)

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop intake; let queued and running batches finish for up to
        ``drain_timeout_s``; then fail what is left with ``Unavailable``."""
        self._accepting = False
        self._wakeup.set()
        deadline = time.monotonic() + drain_timeout_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for pending in list(self._queue):
            self._finish(pending, exc=Unavailable("the engine was unloaded before this request ran"))
        self._queue.clear()
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
        for the adaptive plan."""
        self.run_batch = run_batch
        if latency_profile_ms is not None:
            self._cost = fit_batch_cost(latency_profile_ms)
            self._next_plan_at = 0.0  # re-plan at the next arrival
        self._generation += 1
        generation = self._generation
        while any(g < generation for g in self._running_by_generation):
            self._batch_ended.clear()
            await self._batch_ended.wait()

    # -- intake ----------------------------------------------------------------

    async def infer(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        timeout_ms: float | None = None,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue one request (one or more rows) and wait for its outputs.

        ``feeds`` must have passed ``Runner.check_feeds`` (the one place where
        names, dtypes, shapes and the batch range are checked). Raises
        ``Unavailable`` (queue full or stopping), ``DeadlineExceeded`` (the
        deadline passed before it ran), or whatever the engine raised for its batch. ``disconnected``,
        when given, is awaited once the request has waited a little: if it
        returns first, the request is dropped from the queue and
        ``asyncio.CancelledError`` is raised.
        """
        self.check_capacity()
        rows, key = self._rows_and_key(feeds)
        loop = asyncio.get_running_loop()
        timeout_s = self.config.timeout_ms / 1000.0
        if timeout_ms is not None:
            timeout_s = min(timeout_s, max(timeout_ms, 0.0) / 1000.0)
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        pending = _Pending(feeds, rows, key, future, time.monotonic() + timeout_s)
        pending.timer = loop.call_later(timeout_s, self._expire, pending)
        self._queue.append(pending)
        self._report_depth()
        if self._adaptive:
            self._observe_arrival(pending.enqueued)
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
                    watcher.add_done_callback(lambda w: None if w.cancelled() else self._abandon(pending))

            watch = loop.call_later(DISCONNECT_CHECK_AFTER_S, start_watching)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(pending)
            raise
        finally:
            if watch is not None:
                watch.cancel()
            if watcher is not None:
                watcher.cancel()

    def check_capacity(self) -> None:
        """Raise ``Unavailable`` (503, Retry-After) when a request would be refused:
        routes call it before decoding a body, so that refusals under overload
        stay cheap."""
        if not self._accepting:
            self._reject("stopping")
            raise Unavailable(
                "the server is not accepting requests for this engine", headers={"Retry-After": "1"}
            )
        if len(self._queue) >= self.config.max_queue_size:
            self._reject("queue_full")
            raise Unavailable(
                f"engine '{self.name}' has {len(self._queue)} requests queued, its limit",
                headers={"Retry-After": "1"},
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
        if self.observer is not None:
            self.observer.adapted(self._delay_s, self._cap)

    @property
    def plan(self) -> tuple[float, int]:
        """The current queue delay (seconds) and batch cap."""
        return self._delay_s, self._cap

    def _rows_and_key(self, feeds: Mapping[str, np.ndarray]) -> tuple[int, tuple[Any, ...]]:
        if not self.batchable:
            return 1, ()
        # The feeds were checked (Runner.check_feeds): 1..max_batch_size rows, one batch size.
        arrays = list(feeds.values())
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        if len(feeds) == 1:
            ((name, array),) = feeds.items()
            key: tuple[Any, ...] = ((name, array.shape[1:]),)
        else:
            key = tuple((name, array.shape[1:]) for name, array in sorted(feeds.items()))
        return rows, key

    def _abandon(self, pending: _Pending) -> None:
        """The caller is gone: drop the request if it has not started."""
        if pending.state == _QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
            self._report_depth()
        self._finish(pending, cancel=True)

    def _expire(self, pending: _Pending) -> None:
        if pending.state != _QUEUED:
            return
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
        self._report_depth()
        self._reject("deadline")
        self._finish(
            pending,
            exc=DeadlineExceeded(
                f"the request waited {1000 * (time.monotonic() - pending.enqueued):.0f} ms in the "
                "queue and its deadline passed before it could run"
            ),
        )

    def _finish(
        self,
        pending: _Pending,
        *,
        result: dict[str, np.ndarray] | None = None,
        exc: BaseException | None = None,
        cancel: bool = False,
    ) -> None:
        pending.state = _DONE
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if pending.future.done():
            return
        if cancel:
            pending.future.cancel()
        elif exc is not None:
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(result or {})

    def _reject(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.rejected(reason)

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(len(self._queue))

    # -- batch formation -------------------------------------------------------

    async def _worker(self, thread: InferenceThread) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            await self._execute(batch, thread)

    async def _next_batch(self) -> list[_Pending] | None:
        while True:
            if not self._queue:
                if not self._accepting:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._queue[0]
            if not self.batchable:
                self._queue.popleft()
                self._report_depth()
                return [oldest]
            selected, rows, cut = self._gather(oldest.key)
            waited = time.monotonic() - oldest.enqueued
            if cut is not None or rows >= self._cap or waited >= self._delay_s or not self._accepting:
                chosen = selected if cut is None else selected[:cut]
                self._take(chosen)
                return chosen
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._delay_s - waited)

    def _gather(self, key: tuple[Any, ...]) -> tuple[list[_Pending], int, int | None]:
        """Queued requests with this key in FIFO order that fit one batch; their row
        count; and, when a preferred size is reached, how many of them make it."""
        selected: list[_Pending] = []
        rows = 0
        cut = None
        limit = self._cap
        for pending in self._queue:
            if pending.key != key:
                continue
            if selected and rows + pending.rows > limit:
                break
            selected.append(pending)
            rows += pending.rows
            if rows in self._preferred:
                cut = len(selected)
            if rows == limit:
                break
        return selected, rows, cut

    def _take(self, chosen: list[_Pending]) -> None:
        if len(chosen) == len(self._queue):
            self._queue.clear()
        elif len(chosen) == 1 and self._queue[0] is chosen[0]:
            self._queue.popleft()
        else:
            ids = {id(p) for p in chosen}
            self._queue = deque(p for p in self._queue if id(p) not in ids)
        for pending in chosen:
            pending.state = _RUNNING
            if pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
        self._report_depth()

    # -- execution ---------------------------------------------------------------

    async def _execute(self, batch: list[_Pending], thread: InferenceThread) -> None:
        started = time.monotonic()
        waits = [started - p.enqueued for p in batch]
        rows = sum(p.rows for p in batch)
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {name: np.concatenate([p.feeds[name] for p in batch], axis=0) for name in batch[0].feeds}
        # The engine is chosen when the batch starts: a swap from now on does not move it.
        generation, run_batch = self._generation, self.run_batch
        self._running_by_generation[generation] = self._running_by_generation.get(generation, 0) + 1
        try:
            try:
                outputs = await thread.submit(run_batch, feeds)
            except asyncio.CancelledError:
                # The batcher is stopping: answer this batch's requests, then stop.
                for pending in batch:
                    self._finish(
                        pending,
                        exc=Unavailable(
                            "the engine was unloaded while this request ran", headers={"Retry-After": "1"}
                        ),
                    )
                raise
            results = self._split(batch, rows, outputs)
        except Exception as exc:
            for pending in batch:
                self._finish(pending, exc=exc)
            log.debug("batch of %d requests on %s failed: %s", len(batch), self.name, exc)
            if isinstance(exc, DeviceLost):
                device_lost(exc)
            return
        finally:
            left = self._running_by_generation[generation] - 1
            if left:
                self._running_by_generation[generation] = left
            else:
                del self._running_by_generation[generation]
                self._batch_ended.set()
            self.batches_run += 1
            self.requests_run += len(batch)
        compute_s = time.monotonic() - started
        for pending, result in zip(batch, results, strict=True):
            self._finish(pending, result=result)
        if self.observer is not None:
            self.observer.batch_done(rows, len(batch), compute_s, waits)
        if tracing.enabled():
            tracing.record_batch([p.trace for p in batch], waits, compute_s, rows, self.name)

    def _split(
        self, batch: list[_Pending], rows: int, outputs: dict[str, np.ndarray]
    ) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [outputs]
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != rows:
                raise BatchError(
                    f"output '{name}' has {array.shape[0] if array.ndim else 0} rows for a batch "
                    f"of {rows}; the engine does not keep the batch axis"
                )
        results = []
        offset = 0
        for pending in batch:
            end = offset + pending.rows
            results.append({name: array[offset:end] for name, array in outputs.items()})
            offset = end
        return results
