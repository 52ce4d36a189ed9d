"""A few seconds of overload against a real server: far more concurrent requests
than a slow engine with a small queue can take. The excess is answered at once
with 503 and Retry-After, nothing times out or is dropped, the health endpoint
keeps answering, memory stays put, and the server serves normally afterwards.

benchmarks/overload.py is the full version (hey, several levels, figures)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess
from tests.e2e.test_faults import slow_model

pytestmark = pytest.mark.slow

CONCURRENCY = 64
SECONDS = 3.0

LOAD = """
# A small load generator on raw asyncio streams (HTTP/1.1 keep-alive): Python
# HTTP clients spend more time in their pools than the server takes to refuse.
import asyncio, json, sys, time

host, port = sys.argv[1].removeprefix("http://").split(":")
body = open(sys.argv[2], "rb").read()
concurrency, seconds = int(sys.argv[3]), float(sys.argv[4])
request = (
    f"POST /predict HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Type: application/json\\r\\n"
    f"Content-Length: {len(body)}\\r\\n\\r\\n"
).encode() + body
result = {"statuses": {}, "errors": {}, "retry_after": {}, "kinds": {}}


def add(table, key):
    table[key] = table.get(key, 0) + 1


async def worker(deadline):
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\\r\\n\\r\\n"), 10)
            lines = head.decode("latin-1").split("\\r\\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            content = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            add(result["errors"], type(exc).__name__)
            writer = None
            continue
        status = lines[0].split(" ")[1]
        add(result["statuses"], status)
        if status != "200":
            add(result["kinds"], json.loads(content)["error"]["type"])
            add(result["retry_after"], headers.get("retry-after", "none"))
    if writer is not None:
        writer.close()


async def main():
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))


asyncio.run(main())
print(json.dumps(result))
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "store") as running, running.client() as client:
        upload(
            client,
            slow_model(tmp_path / "slow.onnx", depth=200),
            "slow",
            max_batch_size="1",
            max_queue_size="4",
        )
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


def test_overload_is_refused_with_503_and_the_server_stays_responsive(
    server: ServerProcess, tmp_path: Path
) -> None:
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    body = tmp_path / "body.json"
    row = np.random.default_rng(0).standard_normal(512).astype(np.float32).round(4).tolist()
    body.write_text(json.dumps({"engine": "slow", "inputs": [row]}))
    script = tmp_path / "load.py"
    script.write_text(LOAD)

    rss_before = process.memory_info().rss
    sampler = HealthSampler(server.url)
    sampler.start()
    rss_samples: list[int] = []
    try:
        load = subprocess.Popen(
            [sys.executable, str(script), server.url, str(body), str(CONCURRENCY), str(SECONDS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + SECONDS + 30
        while load.poll() is None and time.monotonic() < deadline:
            rss_samples.append(process.memory_info().rss)
            time.sleep(0.1)
        output, _ = load.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        sampler.stop.set()
        sampler.join(10)
    result = json.loads(output)
    print(
        f"overload: {result}; health p50 {statistics.median(sampler.latencies_ms):.1f} ms, "
        f"max {max(sampler.latencies_ms):.1f} ms over {len(sampler.latencies_ms)} samples; "
        f"RSS {rss_before / 2**20:.0f} -> {max(rss_samples) / 2**20:.0f} MB"
    )

    # Overload is answered, at once and politely: 503 with Retry-After, never a
    # timeout or a dropped connection.
    assert result["errors"] == {}
    assert set(result["statuses"]) == {"200", "503"}, result
    assert result["statuses"]["503"] > result["statuses"]["200"]
    assert result["retry_after"] == {"1": result["statuses"]["503"]}
    assert result["kinds"] == {"unavailable": result["statuses"]["503"]}
    # The event loop kept answering health checks.
    assert sampler.failures == []
    assert len(sampler.latencies_ms) >= 20
    assert statistics.median(sampler.latencies_ms) < 100
    assert max(sampler.latencies_ms) < 1000
    # Memory stayed bounded: the queue holds 4 requests, not the backlog.
    assert max(rss_samples) - rss_before < 64 * 2**20
    # And it serves normally afterwards.
    with server.client() as client:
        assert client.get("/health/ready").status_code == 200
        response = client.post(
            "/predict", content=body.read_bytes(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text
