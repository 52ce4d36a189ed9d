"""A sticky CUDA error takes the process out of readiness and ends it; other errors stay per request."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from engines.errors import DeviceLost, InvalidInput
from service import device_lost as device_lost_module
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import status_of


class FailingEngine:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise self.error


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(device_lost_module.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(device_lost_module, "_reported", threading.Event())
    return sent


async def run_failing_batches(error: Exception, count: int) -> list[BaseException]:
    batcher = DynamicBatcher(FailingEngine(error), BatchingConfig(max_batch_size=1), batchable=True, name="m")  # type: ignore[arg-type]
    batcher.start()
    failures = []
    for _ in range(count):
        with pytest.raises(type(error)) as raised:
            await batcher.infer({"x": np.zeros((1, 2), np.float32)})
        failures.append(raised.value)
    await batcher.stop()
    return failures


async def test_a_lost_device_answers_503_logs_why_and_signals_the_drain_once(
    signals: list[tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    lost = DeviceLost("cudaStreamSynchronize failed: cudaErrorIllegalAddress")
    with caplog.at_level(logging.CRITICAL, logger="kiln.device"):
        failures = await run_failing_batches(lost, 2)
    assert [status_of(failure)[0] for failure in failures] == [503, 503]
    assert len(signals) == 1 and signals[0][1] == signal.SIGTERM, "SIGTERM to itself, once"
    lines = [record.getMessage() for record in caplog.records if record.name == "kiln.device"]
    assert len(lines) == 1 and "cudaErrorIllegalAddress" in lines[0] and "exiting" in lines[0]


async def test_other_errors_stay_with_their_request(signals: list[tuple[int, int]]) -> None:
    failures = await run_failing_batches(InvalidInput("bad shape"), 2)
    assert [status_of(failure)[0] for failure in failures] == [400, 400]
    assert signals == []
