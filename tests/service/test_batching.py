"""Pure asyncio tests of the DynamicBatcher: no server, no sleeps as synchronisation."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from engines.errors import InvalidInput
from service.admission import LatencyModel, QueuePolicy, fit_batch_cost
from service.batching import BatchingConfig, DynamicBatcher, adaptive_plan
from service.refusals import DeadlinePassed, DeadlineUnmeetable, QueueFull, Shed, Stopping


class FakeEngine:
    """y = 2x + 1 per row; records each batch's row count. ``gate`` can hold a run."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.gate.wait(10)
        x = feeds["x"]
        self.batches.append(x.shape[0])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine exploded")
        return {"y": 2 * x + 1, "total": x.sum(axis=tuple(range(1, x.ndim)))}


def rows(n: int, width: int = 3, start: float = 0.0) -> dict[str, np.ndarray]:
    return {"x": (np.arange(n * width, dtype=np.float32).reshape(n, width) + start)}


def make(engine: FakeEngine, **config: object) -> DynamicBatcher:
    batcher = DynamicBatcher(engine, BatchingConfig(**config), batchable=True, name="test")  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_concurrent_requests_land_in_one_batch() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=200)
    results = await asyncio.gather(*(batcher.infer(rows(1, start=i)) for i in range(4)))
    await batcher.stop()
    assert engine.batches == [4]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], 2 * rows(1, start=i)["x"] + 1)


async def test_full_batch_runs_without_waiting_for_the_delay() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4, max_queue_delay_ms=10_000)
    started = time.monotonic()
    await asyncio.gather(*(batcher.infer(rows(1)) for _ in range(4)))
    assert time.monotonic() - started < 5
    await batcher.stop()
    assert engine.batches == [4]


async def test_lone_request_waits_for_the_delay_and_no_longer() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=150)
    task = asyncio.create_task(batcher.infer(rows(1)))
    done, _ = await asyncio.wait({task}, timeout=0.05)
    assert not done, "the request finished before its queue delay"
    started = time.monotonic()
    await asyncio.wait_for(task, timeout=1.0)
    # It waited at most the rest of its delay, plus scheduling slack.
    assert time.monotonic() - started < 0.15 + 0.2
    await batcher.stop()
    assert engine.batches == [1]


async def test_zero_delay_runs_a_lone_request_at_once() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=0)
    await asyncio.wait_for(batcher.infer(rows(1)), timeout=1.0)
    await batcher.stop()
    assert engine.batches == [1]


async def test_requests_queue_while_a_batch_runs_and_then_share_one() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=0)
    first = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    rest = [asyncio.create_task(batcher.infer(rows(1))) for _ in range(5)]
    await asyncio.sleep(0)  # let them queue
    engine.gate.set()
    await asyncio.gather(first, *rest)
    await batcher.stop()
    assert engine.batches == [1, 5]


async def test_queue_full_is_rejected_at_once_with_retry_after() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=1, max_queue_size=2)
    running = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    queued = [asyncio.create_task(batcher.infer(rows(1))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="queued") as excinfo:
        await batcher.infer(rows(1))
    assert excinfo.value.retry_after_s > 0
    engine.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.stop()


async def test_deadline_passes_in_queue_and_the_request_never_runs() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=1)
    running = asyncio.create_task(batcher.infer(rows(1, start=100)))
    await asyncio.to_thread(engine.started.wait, 5)
    with pytest.raises(DeadlinePassed, match="deadline"):
        await batcher.infer(rows(1, start=200), timeout_ms=30)
    engine.gate.set()
    await running
    await batcher.stop()
    assert engine.batches == [1], "the expired request must not run"


async def test_a_failed_batch_is_run_again_one_request_at_a_time() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4, max_queue_delay_ms=100)
    engine.fail_next = True  # the batch fails once, for no request's fault
    results = await asyncio.gather(*(batcher.infer(rows(1, start=i)) for i in range(3)))
    await batcher.stop()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], 2 * rows(1, start=i)["x"] + 1)
    assert engine.batches == [3, 1, 1, 1]


async def test_a_failing_lone_request_fails_alone() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4)
    engine.fail_next = True
    with pytest.raises(RuntimeError, match="exploded"):
        await batcher.infer(rows(1))
    assert "y" in await batcher.infer(rows(1))
    await batcher.stop()
    assert engine.batches == [1, 1]


async def test_only_matching_shapes_share_a_batch() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=100)
    narrow = [batcher.infer(rows(1, width=3)) for _ in range(2)]
    wide = [batcher.infer(rows(1, width=5)) for _ in range(3)]
    results = await asyncio.gather(*narrow, *wide)
    await batcher.stop()
    assert sorted(engine.batches) == [2, 3]
    assert [r["y"].shape for r in results] == [(1, 3)] * 2 + [(1, 5)] * 3


async def test_multi_row_requests_are_split_back_in_order() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=100)
    requests = [rows(2, start=0), rows(3, start=100), rows(1, start=200)]
    results = await asyncio.gather(*(batcher.infer(r) for r in requests))
    await batcher.stop()
    assert engine.batches == [6]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["y"], 2 * request["x"] + 1)
        np.testing.assert_array_equal(result["total"], request["x"].sum(axis=1))


async def test_batch_never_exceeds_max_rows() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4, max_queue_delay_ms=50)
    await asyncio.gather(*(batcher.infer(rows(3)) for _ in range(3)))
    await batcher.stop()
    assert engine.batches == [3, 3, 3]


async def test_preferred_batch_size_closes_a_batch_early() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=10_000, preferred_batch_sizes=(2,))
    tasks = [asyncio.create_task(batcher.infer(rows(1))) for _ in range(3)]
    await asyncio.to_thread(engine.started.wait, 5)
    engine.gate.set()
    done, pending = await asyncio.wait(tasks, timeout=2)
    # Two rows reached the preferred size and ran at once; the third waits for more.
    assert len(done) == 2 and len(pending) == 1
    assert engine.batches == [2]
    await batcher.stop()


async def test_results_equal_unbatched_runs() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=16, max_queue_delay_ms=20, instances=2)
    rng = np.random.default_rng(0)
    requests = [
        {"x": rng.standard_normal((int(rng.integers(1, 4)), 3)).astype(np.float32)} for _ in range(40)
    ]
    results = await asyncio.gather(*(batcher.infer(r) for r in requests))
    await batcher.stop()
    assert len(engine.batches) < len(requests)
    for request, result in zip(requests, results, strict=True):
        alone = FakeEngine()(request)
        np.testing.assert_array_equal(result["y"], alone["y"])
        np.testing.assert_array_equal(result["total"], alone["total"])


async def test_disconnected_client_is_dropped_from_the_queue() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=1)
    running = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    gone = asyncio.Event()

    async def disconnected() -> None:
        await gone.wait()

    waiting = asyncio.create_task(batcher.infer(rows(1, start=9), disconnected=disconnected))
    await asyncio.sleep(0)
    assert batcher.queue_depth == 1
    gone.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert batcher.queue_depth == 0
    engine.gate.set()
    await running
    await batcher.stop()
    assert engine.batches == [1]


async def test_unbatchable_engine_runs_one_request_at_a_time() -> None:
    engine = FakeEngine()
    batcher = DynamicBatcher(
        engine, BatchingConfig(max_batch_size=1, max_queue_delay_ms=50), batchable=False, name="unbatched"
    )
    batcher.start()
    await asyncio.gather(*(batcher.infer(rows(1)) for _ in range(3)))
    await batcher.stop()
    assert engine.batches == [1, 1, 1]


async def test_stop_lets_queued_requests_finish_then_refuses_new_ones() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=2, max_queue_delay_ms=0)
    tasks = [asyncio.create_task(batcher.infer(rows(1))) for _ in range(5)]
    await asyncio.sleep(0)
    await batcher.stop(drain_timeout_s=5)
    results = await asyncio.gather(*tasks)
    assert len(results) == 5 and sum(engine.batches) == 5
    with pytest.raises(Stopping):
        await batcher.infer(rows(1))


def test_batch_cost_is_fitted_as_a_line() -> None:
    fixed, per_row = fit_batch_cost({1: 1.5, 4: 3.0, 8: 5.0})
    assert fixed == pytest.approx(1.0, abs=0.01)
    assert per_row == pytest.approx(0.5, abs=0.01)
    assert fit_batch_cost({4: 2.0}) == (0.0, 0.5)


def test_adaptive_plan_fits_fill_and_run_time_in_the_target() -> None:
    # 1 ms + 0.5 ms per row; 10 ms target.
    # 2,000 requests/s: 8 rows fill in 3.5 ms and run in 5 ms -> 8.5 ms, within target.
    delay, cap = adaptive_plan(1.0, 0.5, 2000.0, 10.0, 8)
    assert cap == 8 and delay == pytest.approx(0.0035)
    # 100 requests/s: a second request takes 10 ms to come: run alone, no waiting.
    assert adaptive_plan(1.0, 0.5, 100.0, 10.0, 8) == (0.0, 1)
    # 500 requests/s: fill 2 ms per row; 3 rows -> 4 ms + 2.5 ms = 6.5; 4 rows -> 6 + 3 = 9.
    delay, cap = adaptive_plan(1.0, 0.5, 500.0, 10.0, 8)
    assert cap == 4 and delay == pytest.approx(0.006)


class RecordingObserver:
    def __init__(self) -> None:
        self.plans: list[tuple[float, int]] = []

    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, rows: int, requests: int, compute_s: float, queue_waits_s: list[float]) -> None:
        pass

    def reran(self, requests: int) -> None:
        pass

    def load_ratio_from(self, read: object) -> None:
        pass

    def adapted(self, delay_s: float, batch_cap: int) -> None:
        self.plans.append((delay_s, batch_cap))


async def test_adaptive_batcher_follows_the_arrival_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.batching.ADAPTIVE_REPLAN_S", 0.0)  # re-plan on every arrival
    engine = FakeEngine()
    observer = RecordingObserver()
    batcher = DynamicBatcher(
        engine,
        BatchingConfig(max_batch_size=8, latency_target_ms=50),
        batchable=True,
        observer=observer,
        name="adaptive",
        latency_profile_ms={1: 1.0, 8: 4.0},
        policy=QueuePolicy(queue_target_ms=0),  # a burst of 200 without deadlines: no standing-queue budget
    )
    batcher.start()
    # A lone first request: no rate known yet, so it runs without waiting.
    await asyncio.wait_for(batcher.infer(rows(1)), timeout=1.0)
    assert batcher.plan == (0.0, 8)
    # A burst: the measured rate is high, so the plan allows waiting to fill batches.
    await asyncio.gather(*(batcher.infer(rows(1)) for _ in range(200)))
    await batcher.stop()
    assert observer.plans, "the plan was never exported"
    delay, cap = observer.plans[-1]
    assert cap == 8 and 0.0 < delay <= 0.05
    assert max(engine.batches) > 1


async def test_stop_during_a_running_batch_answers_its_requests() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=2, max_queue_delay_ms=50)
    tasks = [asyncio.create_task(batcher.infer(rows(1))) for _ in range(2)]
    await asyncio.to_thread(engine.started.wait, 5)
    await batcher.stop(drain_timeout_s=0)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=2)
    assert all(isinstance(r, Stopping) and "unloaded" in str(r) for r in results)
    engine.gate.set()


class TaggedEngine(FakeEngine):
    """y = 2x + offset: tells which engine answered. Calls after ``close`` fail, as a
    closed runner's do."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset
        self.closed = False

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise RuntimeError("engine is closed")
        self.started.set()
        self.gate.wait(10)
        self.batches.append(feeds["x"].shape[0])
        return {"y": 2 * feeds["x"] + self.offset}


def answered_by(result: dict[str, np.ndarray], request: dict[str, np.ndarray]) -> float:
    return float((result["y"] - 2 * request["x"]).flat[0])


async def test_swap_sends_new_batches_to_the_new_engine_while_the_running_one_finishes() -> None:
    old, new = TaggedEngine(1.0), TaggedEngine(2.0)
    old.gate.clear()
    batcher = make(old, max_batch_size=4, instances=2)  # type: ignore[arg-type]
    first = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(old.started.wait, 5)
    swap = asyncio.create_task(batcher.swap(new))
    # A request made while the old batch still runs goes to the new engine at once.
    second = rows(1, start=10)
    result = await asyncio.wait_for(batcher.infer(second), timeout=2)
    assert answered_by(result, second) == 2.0
    assert not swap.done(), "swap returned while a batch still ran on the old engine"
    old.gate.set()
    assert answered_by(await first, rows(1)) == 1.0
    await asyncio.wait_for(swap, timeout=2)
    old.closed = True
    third = rows(2, start=20)
    assert answered_by(await batcher.infer(third), third) == 2.0
    await batcher.stop()
    assert old.batches == [1] and new.batches == [1, 2]


async def test_requests_queued_behind_a_running_batch_wait_one_batch_then_run_on_the_new_engine() -> None:
    old, new = TaggedEngine(1.0), TaggedEngine(2.0)
    old.gate.clear()
    batcher = make(old, max_batch_size=8, instances=1)  # type: ignore[arg-type]
    running = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(old.started.wait, 5)
    queued = [rows(1, start=i) for i in range(5)]
    tasks = [asyncio.create_task(batcher.infer(feeds)) for feeds in queued]
    await asyncio.sleep(0)  # let them queue
    swap = asyncio.create_task(batcher.swap(new))
    await asyncio.sleep(0)
    assert not swap.done()
    old.gate.set()
    await asyncio.wait_for(swap, timeout=2)
    old.closed = True
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=2)
    await running
    await batcher.stop()
    assert [answered_by(r, f) for r, f in zip(results, queued, strict=True)] == [2.0] * 5
    assert old.batches == [1], "only the batch already running may use the old engine"
    assert new.batches == [5], "the queued requests form the next batch, on the new engine"


async def test_no_request_fails_across_repeated_swaps_under_load() -> None:
    engines = [TaggedEngine(float(i)) for i in range(1, 5)]
    batcher = make(engines[0], max_batch_size=4, instances=2)  # type: ignore[arg-type]
    stop = asyncio.Event()
    answers: list[float] = []
    errors: list[BaseException] = []

    async def client(k: int) -> None:
        n = 0
        while not stop.is_set():
            feeds = rows(1, start=k * 1000 + n)
            n += 1
            try:
                answers.append(answered_by(await batcher.infer(feeds), feeds))
            except Exception as exc:
                errors.append(exc)

    clients = [asyncio.create_task(client(k)) for k in range(8)]
    for previous, following in itertools.pairwise(engines):
        await asyncio.sleep(0.05)
        await batcher.swap(following)
        previous.closed = True  # closed as soon as swap returns: a later call would fail
        served_before = len(answers)
        await asyncio.sleep(0.02)
        assert len(answers) > served_before, "traffic stopped after a swap"
    stop.set()
    await asyncio.gather(*clients)
    await batcher.stop()
    assert errors == []
    assert set(answers) == {1.0, 2.0, 3.0, 4.0}
    assert answers[-1] == 4.0


async def test_swap_gives_the_adaptive_plan_the_new_engines_latency() -> None:
    old, new = TaggedEngine(1.0), TaggedEngine(2.0)
    batcher = DynamicBatcher(
        old, BatchingConfig(max_batch_size=8, latency_target_ms=10), batchable=True, name="adaptive"
    )
    batcher.start()
    # 1,000 requests/s (arrival times given, not slept). Without a profile a run is
    # thought free, so all 8 rows fit in the 10 ms target.
    arrivals = (100.0 + i / 1000 for i in itertools.count())
    for _ in range(300):
        batcher._observe_arrival(next(arrivals))
    assert batcher.plan == (pytest.approx(0.007, rel=0.05), 8)
    # The new engine takes 7.5 ms per batch: 2.5 ms are left to fill, so 3 rows at most.
    await batcher.swap(new, latency_profile_ms={1: 7.5, 8: 7.5})
    batcher._observe_arrival(next(arrivals))
    assert batcher.plan == (pytest.approx(0.002, rel=0.05), 3)
    await batcher.stop()


class PickyEngine(FakeEngine):
    """Refuses any batch holding a negative value, as an engine refuses an index out
    of range: only the request that holds it is at fault."""

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.gate.wait(10)
        self.batches.append(feeds["x"].shape[0])
        if (feeds["x"] < 0).any():
            raise InvalidInput("index -1 is out of range")
        return {"y": 2 * feeds["x"] + 1}


async def test_one_bad_request_fails_alone_and_its_batch_mates_are_answered() -> None:
    engine = PickyEngine()
    batcher = make(engine, max_batch_size=8, max_queue_delay_ms=500)  # type: ignore[arg-type]
    requests = [rows(1, start=i) for i in range(8)]
    requests[5] = {"x": -np.ones((1, 3), np.float32)}
    results = await asyncio.gather(*(batcher.infer(r) for r in requests), return_exceptions=True)
    await batcher.stop()
    assert engine.batches[0] == 8, "they were batched together"
    assert engine.batches[1:] == [1] * 8, "then run again one by one"
    assert isinstance(results[5], InvalidInput) and "out of range" in str(results[5])
    for i, result in enumerate(results):
        if i != 5:
            assert isinstance(result, dict)
            np.testing.assert_array_equal(result["y"], 2 * requests[i]["x"] + 1)


async def test_a_request_bigger_than_the_batch_runs_as_engine_sized_batches() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=8)
    big = rows(20)
    result = await batcher.infer(big)
    await batcher.stop()
    assert engine.batches == [8, 8, 4]
    np.testing.assert_array_equal(result["y"], 2 * big["x"] + 1)
    np.testing.assert_array_equal(result["total"], big["x"].sum(axis=1))
    assert batcher.queue_depth == 0


async def test_a_failing_part_fails_the_whole_split_request_and_drops_the_rest() -> None:
    engine = PickyEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=4)  # type: ignore[arg-type]
    blocker = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    big = rows(12)
    big["x"][5] = -1  # in the second part
    task = asyncio.create_task(batcher.infer(big))
    await asyncio.sleep(0)
    engine.gate.set()
    with pytest.raises(InvalidInput):
        await task
    await blocker
    await batcher.stop()
    assert engine.batches == [1, 4, 4], "the third part never ran"
    assert batcher.queue_depth == 0


async def test_higher_priority_is_served_first() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=2)
    order: list[str] = []

    async def call(label: str, priority: int) -> None:
        await batcher.infer(rows(1), priority=priority)
        order.append(label)

    first = asyncio.create_task(call("first", 2))
    await asyncio.to_thread(engine.started.wait, 5)
    low = [asyncio.create_task(call(f"low{i}", 2)) for i in range(3)]
    await asyncio.sleep(0)
    high = [asyncio.create_task(call(f"high{i}", 1)) for i in range(2)]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(first, *low, *high)
    await batcher.stop()
    assert order[:3] == ["first", "high0", "high1"]
    assert engine.batches == [1, 2, 2, 1]


async def test_a_full_queue_sheds_the_newest_lower_priority_request() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_size=1, max_queue_size=2)
    running = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    low = [asyncio.create_task(batcher.infer(rows(1), priority=2)) for _ in range(2)]
    await asyncio.sleep(0)
    high = asyncio.create_task(batcher.infer(rows(1), priority=1))
    await asyncio.sleep(0)
    with pytest.raises(Shed, match="higher-priority"):
        await low[1]
    with pytest.raises(QueueFull):  # the queue is full of work as important as this
        await batcher.infer(rows(1), priority=2)
    engine.gate.set()
    await asyncio.gather(running, high, low[0])
    await batcher.stop()


async def test_work_queued_past_the_deadline_is_refused_at_once() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    # The engine is believed to take 100 ms a batch.
    batcher = DynamicBatcher(
        engine, BatchingConfig(max_batch_size=1), batchable=True, latency_profile_ms={1: 100.0, 8: 100.0}
    )
    batcher.start()
    running = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    queued = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(DeadlineUnmeetable) as refused:
        await batcher.infer(rows(1), timeout_ms=150)  # 100 ms running + 100 queued + its own 100
    assert time.monotonic() - started < 0.1, "refused at once, not after waiting"
    assert 0.1 <= refused.value.retry_after_s <= 0.3
    engine.gate.set()
    await asyncio.gather(running, queued)
    await batcher.stop()


async def test_work_that_cannot_finish_in_time_is_dropped_before_it_runs() -> None:
    engine = FakeEngine()
    batcher = DynamicBatcher(
        engine, BatchingConfig(max_batch_size=8), batchable=True, latency_profile_ms={1: 500.0, 8: 500.0}
    )
    batcher.start()
    with pytest.raises(DeadlinePassed, match="would end after its deadline"):
        await batcher.infer(rows(1), timeout_ms=100)
    await batcher.stop()
    assert engine.batches == [], "it never ran"


class FixedLatency(LatencyModel):
    """A latency model that live runs do not change."""

    def observe(self, rows: int, seconds: float) -> None:
        pass


async def test_a_batch_closes_before_it_would_run_past_a_members_deadline() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    batcher = DynamicBatcher(
        engine,
        BatchingConfig(max_batch_size=8),
        batchable=True,
        latency_profile_ms={1: 200.0, 8: 1600.0},  # 200 ms a row
        policy=QueuePolicy(admission=False),
    )
    batcher.start()
    batcher.admission.latency = FixedLatency({1: 200.0, 8: 1600.0})  # the fake's runs take no time
    running = asyncio.create_task(batcher.infer(rows(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    queued = [asyncio.create_task(batcher.infer(rows(1), timeout_ms=1500)) for _ in range(8)]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.stop()
    # 7 rows would run 1,400 ms; 8 would run 1,600 ms, past the 1,500 ms deadline.
    assert engine.batches == [1, 7, 1]
