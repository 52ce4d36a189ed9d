"""A few seconds of 5x overload against a real server, open-loop: Poisson arrivals
that do not slow down when the server does, each with a deadline. A low-priority
flood at 5x the engine's measured capacity, with high-priority requests inside
it. The flood's excess is refused at once with 503 and a computed Retry-After,
the high-priority requests are all answered in time, nothing is reset, health
keeps answering, memory stays put, and the server serves normally afterwards.

benchmarks/overload.py is the full version (levels 1x-5x, two models, pinned
cores, figures in docs/BENCHMARKS.md); here the margins allow for a loaded CI
machine."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess
from tests.e2e.test_faults import slow_model

pytestmark = pytest.mark.slow

SECONDS = 3.0
DEADLINE_MS = 1000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "store") as running, running.client() as client:
        upload(client, slow_model(tmp_path / "slow.onnx", depth=400), "slow", max_batch_size="1")
        assert wait_for_state(client, "slow", timeout_s=120)["state"] == "ready"
        yield running


class HealthSampler(threading.Thread):
    """GET /health/live every 50 ms on a connection opened before the load."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=url, timeout=5)
        self.client.get("/health/live")
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    status = self.client.get("/health/live").status_code
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                    if status != 200:
                        self.failures.append(str(status))
                except httpx.HTTPError as exc:
                    self.failures.append(type(exc).__name__)
                self.stop.wait(max(0.0, 0.05 - (time.perf_counter() - started)))
        finally:
            self.client.close()


def generate(
    server: ServerProcess, work: Path, seconds: float, streams: list[dict[str, Any]]
) -> dict[str, Any]:
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "port": server.port,
                "seconds": seconds,
                "warm_connections": 64,
                "streams": streams,
            }
        )
    )
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.open_loop", str(spec)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 90,
    ).stdout
    return {s["name"]: s for s in json.loads(output.strip().splitlines()[-1])}


def body(work: Path, name: str, priority: int) -> str:
    row = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32).round(4).tolist()
    path = work / f"{name}.json"
    path.write_text(
        json.dumps({"engine": "slow", "inputs": row, "timeout_ms": DEADLINE_MS, "priority": priority})
    )
    return str(path)


def test_5x_overload_refuses_the_excess_at_once_and_serves_high_priority_in_time(
    server: ServerProcess, tmp_path: Path
) -> None:
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    headers = {"Content-Type": "application/json"}
    low, high = body(tmp_path, "low", 2), body(tmp_path, "high", 1)
    stream = {"path": "/predict", "headers": headers, "deadline_ms": DEADLINE_MS}
    capacity_run = generate(
        server, tmp_path, 1.5, [{**stream, "name": "cap", "body_file": low, "closed": 8}]
    )["cap"]
    capacity = capacity_run["statuses"]["200"] / capacity_run["seconds"]

    rss_before = process.memory_info().rss
    sampler = HealthSampler(server.url)
    sampler.start()
    rss: list[int] = []
    watching = threading.Event()

    def watch_rss() -> None:
        while not watching.is_set():
            rss.append(process.memory_info().rss)
            watching.wait(0.1)

    watcher = threading.Thread(target=watch_rss, daemon=True)
    watcher.start()
    try:
        result = generate(
            server,
            tmp_path,
            SECONDS,
            [
                {**stream, "name": "flood", "body_file": low, "rate": 5 * capacity},
                {**stream, "name": "high", "body_file": high, "rate": 0.5 * capacity},
            ],
        )
    finally:
        sampler.stop.set()
        watching.set()
        sampler.join(10)
        watcher.join(10)
    flood, vip = result["flood"], result["high"]
    live = sorted(sampler.latencies_ms)
    print(
        f"capacity {capacity:.0f}/s; flood {flood['statuses']} refusal p99 {flood['refusal_p99_ms']} ms, "
        f"Retry-After {flood['retry_after']} (ms p50 {flood['retry_after_ms_p50']}); high {vip['statuses']} "
        f"in time {vip['in_time']}, p99 {vip['ok_p99_ms']} ms; "
        f"health p99 {live[int(0.99 * (len(live) - 1))]:.1f} ms; "
        f"RSS {rss_before / 2**20:.0f} -> {max(rss) / 2**20:.0f} MB; "
        f"generator lag p99 {flood['lag_p99_ms']} ms"
    )

    # Nothing is dropped or reset: every request gets an answer.
    assert flood["errors"] == {} and vip["errors"] == {}
    # The flood's excess is refused, at once, with a computed Retry-After.
    refused = flood["statuses"].get("503", 0)
    assert refused > flood["statuses"].get("200", 0)
    # (504: a low-priority request queued in time whose deadline the high-priority
    # work then took; it never ran.)
    assert set(flood["statuses"]) <= {"200", "503", "504"}, flood["statuses"]
    assert flood["retry_after"].get("none", 0) == 0
    assert flood["retry_after_ms_p50"] is not None and flood["retry_after_ms_p50"] > 0
    # Refused on arrival within milliseconds (p99 under 10 ms for a uniform flood on a
    # quiet machine: docs/BENCHMARKS.md); queued low-priority requests that high-priority
    # work displaces are shed when it does, never after their deadline.
    assert flood["refusal_p50_ms"] < 50
    assert flood["refusal_p99_ms"] < DEADLINE_MS
    # High priority inside the flood: every request answered 200, within its deadline.
    assert vip["statuses"] == {"200": vip["sent"]}
    assert vip["in_time"] == vip["sent"]
    # The event loop kept answering health checks; memory stayed bounded.
    assert sampler.failures == []
    assert len(live) >= 20 and live[int(0.99 * (len(live) - 1))] < 250
    assert max(rss) - rss_before < 64 * 2**20
    with server.client() as client:
        assert client.get("/health/ready").status_code == 200
        response = client.post("/predict", content=Path(high).read_bytes(), headers=headers)
        assert response.status_code == 200, response.text
        metrics = client.get("/metrics").text
    assert 'kiln_engine_load_ratio{engine="slow",version="1"}' in metrics
    assert (
        'kiln_rejected_requests_total{engine="slow",reason="deadline_unmeetable",version="1"}' in metrics
        or ('reason="queue_timeout"' in metrics)
    )
