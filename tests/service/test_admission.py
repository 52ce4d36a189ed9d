"""Admission's predictions and decisions, on an explicit clock (no event loop, no sleeps)."""

from __future__ import annotations

import math

import pytest

from service.admission import Admission, LatencyModel, QueuePolicy, RateMeter
from service.refusals import DeadlineUnmeetable, QueueTimeout


def admission(policy: QueuePolicy | None = None, **kwargs: object) -> Admission:
    values: dict[str, object] = {
        "max_batch_size": 8,
        "instances": 1,
        "priority_levels": 2,
        "default_priority_level": 1,
        "policy": policy or QueuePolicy(),
        # 1 ms + 4 ms a row: a full batch of 8 takes 33 ms.
        "latency_profile_ms": {1: 5.0, 8: 33.0},
    }
    values.update(kwargs)
    return Admission(**values)  # type: ignore[arg-type]


def test_latency_model_follows_live_runs() -> None:
    model = LatencyModel({1: 5.0, 8: 33.0})
    assert model.cost(8) == pytest.approx(0.033)
    model.observe(8, 0.061)  # the first live run at a size replaces the profile's point
    assert model.cost(8) == pytest.approx(0.061, rel=0.02)  # the line through (1, 5 ms) and (8, 61 ms)
    for _ in range(16):  # later ones are smoothed in (and the line refitted now and then)
        model.observe(8, 0.101)
    assert 0.07 < model.cost(8) < 0.101
    assert LatencyModel().cost(8) == 0.0 and not LatencyModel().known


def test_live_runs_at_one_size_correct_the_profile_at_the_others() -> None:
    model = LatencyModel({1: 10.0, 8: 80.0})  # measured on a busy machine: twice too slow
    for _ in range(20):
        model.observe(1, 0.005)
    assert model.cost(8) == pytest.approx(0.040, rel=0.1)


def test_rate_meter_measures_events_per_second() -> None:
    meter = RateMeter(window_s=1.0)
    for i in range(2000):  # 200 per second for 10 s
        meter.add(1, i * 0.005)
    assert meter.rate(10.0) == pytest.approx(200, rel=0.05)
    assert meter.rate(20.0) < 1  # it decays once arrivals stop


def test_levels_follow_triton() -> None:
    gate = admission(priority_levels=3, default_priority_level=2)
    assert [gate.level_of(p) for p in (None, 0, 1, 2, 3, 4)] == [2, 2, 1, 2, 3, 2]


def test_an_idle_engine_admits_whatever_the_deadline() -> None:
    gate = admission()
    gate.check(1, 1, deadline=0.001, now=0.0)  # nothing ahead: always tried


def test_work_queued_ahead_past_the_deadline_is_refused_with_its_drain_time() -> None:
    gate = admission()
    token = gate.started({1: 8}, 8, now=0.0)  # a full batch runs until 33 ms
    for _ in range(16):
        gate.queued(1, 1)  # two more full batches queued: 66 ms
    wait, done, ahead = gate.predict(1, 1, now=0.0)
    assert ahead == 16
    assert wait == pytest.approx(0.033 + 2 * 0.033)
    assert done == pytest.approx(0.033 + 2 * 0.033 + 0.005)
    gate.check(1, 1, deadline=0.2, now=0.0)  # 104 ms < 200 ms
    with pytest.raises(DeadlineUnmeetable, match="16 rows are queued ahead") as refused:
        gate.check(1, 1, deadline=0.05, now=0.0)
    # What is queued ahead drains in 33 ms (running) + 16 rows at 8 per 33 ms.
    assert refused.value.retry_after_s == pytest.approx(0.033 + 0.066)
    gate.finished(token, 8, 0.033)


def test_lower_priority_counts_the_work_of_higher_levels_too() -> None:
    gate = admission()
    for _ in range(8):
        gate.queued(2, 1)
    assert gate.predict(1, 1, now=0.0)[2] == 0  # high priority goes ahead of the low queue
    assert gate.predict(2, 1, now=0.0)[2] == 8


def test_higher_levels_taking_the_engine_stretch_lower_levels_predictions() -> None:
    gate = admission()
    for _ in range(8):
        gate.queued(2, 1)
    calm = gate.predict(2, 1, now=10.0)[1]
    for step in range(1200):  # high priority takes 200 rows/s: most of a 242 rows/s engine
        gate.finished(gate.started({1: 1}, 1, now=step * 0.005), 1, None)
    busy = gate.predict(2, 1, now=6.0)[1]
    assert busy > 3 * calm


def test_a_standing_queue_shrinks_the_wait_budget_until_it_drains() -> None:
    gate = admission(QueuePolicy(queue_interval_ms=100))
    gate.check(1, 1, deadline=10.0, now=0.0)  # empty: the queue drains
    gate.queued(1, 1)
    target = gate.target_s()
    assert target == pytest.approx(0.033)  # one full batch
    assert gate.queue_timeout(0.05) is None  # not for a whole interval yet
    gate.left_queue(1, 1, last_part=True, waited=0.2, now=0.2)  # left the queue empty: drained
    for _ in range(20):
        gate.queued(1, 1)
    gate.left_queue(1, 1, last_part=True, waited=0.2, now=0.25)  # waited long, queue not empty
    assert gate.queue_timeout(0.31) == pytest.approx(target)
    gate.started({1: 8}, 8, now=0.31)
    gate.check(1, 1, deadline=100.0, now=0.31)  # a client's own deadline is what it waits for
    with pytest.raises(QueueTimeout, match="budget of a standing queue"):
        gate.check(1, 1, deadline=100.0, now=0.31, explicit=False)  # the engine's timeout: the budget
    gate.left_queue(1, 1, last_part=True, waited=0.01, now=0.4)  # a short wait: it drains again
    assert gate.queue_timeout(0.41) is None


def test_queue_timeouts_and_deadline_refusals_can_be_turned_off() -> None:
    gate = admission(QueuePolicy(admission=False))
    gate.started({1: 8}, 8, now=0.0)
    for _ in range(100):
        gate.queued(1, 1)
    gate.check(1, 1, deadline=0.001, now=0.0)
    assert admission(QueuePolicy(queue_target_ms=0)).target_s() is None


def test_load_ratio_is_demand_over_full_batch_capacity() -> None:
    gate = admission()
    capacity = gate.capacity()
    assert capacity == pytest.approx(8 / 0.033)
    for i in range(4000):  # twice the capacity, for 8 s
        gate.refused_early(1, i / (2 * capacity))
    assert gate.load_ratio(4000 / (2 * capacity)) == pytest.approx(2 * (1 - math.exp(-8.26 / 10)), rel=0.1)
    assert admission(latency_profile_ms={}).load_ratio(1.0) == 0.0
