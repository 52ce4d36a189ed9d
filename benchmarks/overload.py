"""Overload: kiln driven at many times an engine's capacity.

A wide MLP (256 -> 2048 -> 2048 -> 2048 -> 256, ~9.4 M multiply-adds a row, a few
ms per batch of 8) is served with a small queue (max_queue_size 16). First hey
measures the engine's capacity at a concurrency the queue holds; then hey drives
it at higher concurrencies, each for a fixed time, while sampler threads here

- GET /health/live every 50 ms on a kept-alive connection, and every 250 ms on a
  new connection (as a Kubernetes probe does), and time both,
- POST one /predict every 100 ms and record its status and Retry-After,
- read the server's RSS every 100 ms (psutil).

Overload must be answered with 503 and Retry-After at once: no timeouts, no
dropped connections, bounded memory, and the server serves normally afterwards.
Each event loop in ``--loops`` gets its own server (KILN_EVENT_LOOP). Loopback
only; every run stops by itself. Needs `hey` (Debian package).

    .venv/bin/python -m benchmarks.overload [--seconds 8] [--concurrency 64,256,512] [--loops uvloop,asyncio]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import Server, hey_command, start_kiln, upload

QUEUE_SIZE = 16
MAX_BATCH = 8
WIDTH = 256
HIDDEN = 2048


def wide_mlp(path: Path, width: int = WIDTH, hidden: int = HIDDEN, layers: int = 3) -> Path:
    """x[batch, width] -> (Gemm, Relu) x layers at ``hidden`` wide -> Gemm -> y[batch, width]."""
    rng = np.random.default_rng(0)
    sizes = [width] + [hidden] * layers + [width]
    nodes, initializers, previous = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        output = "y" if last else f"r{i}"
        nodes.append(
            helper.make_node(
                "Gemm", [previous, f"w{i}", f"b{i}"], [f"g{i}" if not last else output], transB=1
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [output]))
        weight = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        previous = output
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


@dataclass
class HeyResult:
    seconds: float
    rps: float
    statuses: dict[int, int]
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    server_cpu_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())


def run_hey(url: str, body: Path, *, seconds: float, concurrency: int) -> HeyResult:
    """hey for ``seconds`` at ``concurrency``, with a 10 s per-request timeout."""
    command = hey_command(url, body, seconds=seconds, concurrency=concurrency, timeout_s=10)
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", output)}
    errors: dict[str, int] = {}
    if "Error distribution:" in output:
        for n, message in re.findall(r"\[(\d+)\]\s+(.+)", output.split("Error distribution:", 1)[1]):
            kind = (
                "timeout"
                if "Timeout" in message or "deadline" in message
                else ("reset" if "reset" in message else "refused" if "refused" in message else message[-60:])
            )
            errors[kind] = errors.get(kind, 0) + int(n)
    percentiles = {}
    for pct in ("50", "99"):
        match = re.search(rf"{pct}% in ([\d.]+) secs", output)
        percentiles[pct] = float(match.group(1)) * 1000 if match else float("nan")
    return HeyResult(
        seconds, float(rps.group(1)) if rps else 0.0, statuses, errors, percentiles["50"], percentiles["99"]
    )


@dataclass
class Samples:
    live_ms: list[float] = field(default_factory=list)
    new_connection_ms: list[float] = field(default_factory=list)
    live_failures: int = 0
    probe_statuses: dict[int, int] = field(default_factory=dict)
    probe_503_without_retry_after: int = 0
    rss_bytes: list[int] = field(default_factory=list)


class Sampler:
    """Health latency (kept-alive and new connections), one prediction's status and
    the server's RSS, sampled from two threads until stopped."""

    def __init__(self, server: Server, body: bytes) -> None:
        self.server = server
        self.body = body
        self.samples = Samples()
        self.stop = threading.Event()
        self.client = httpx.Client(base_url=server.url, timeout=10)
        self.client.get("/health/live")  # connect now, before the load starts
        self.threads = [
            threading.Thread(target=self._kept_alive, daemon=True),
            threading.Thread(target=self._new_connections, daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
        self.client.close()

    def _kept_alive(self) -> None:
        process = psutil.Process(self.server.process.pid)
        tick = 0
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                ok = self.client.get("/health/live").status_code == 200
                self.samples.live_ms.append((time.perf_counter() - started) * 1000)
                self.samples.live_failures += not ok
            except httpx.HTTPError:
                self.samples.live_failures += 1
            if tick % 2 == 0:
                self.samples.rss_bytes.append(process.memory_info().rss)
                try:
                    response = self.client.post(
                        "/predict", content=self.body, headers={"Content-Type": "application/json"}
                    )
                    code = response.status_code
                    if code == 503 and not response.headers.get("retry-after"):
                        self.samples.probe_503_without_retry_after += 1
                except httpx.HTTPError:
                    code = 0
                self.samples.probe_statuses[code] = self.samples.probe_statuses.get(code, 0) + 1
            tick += 1
            self.stop.wait(max(0.0, 0.05 - (time.perf_counter() - started)))

    def _new_connections(self) -> None:
        host, port = self.server.url.removeprefix("http://").split(":")
        request = f"GET /health/live HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        while not self.stop.is_set():
            started = time.perf_counter()
            try:  # a raw socket: the time is the server's, not an HTTP client's set-up
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(request)
                    ok = sock.recv(64).startswith(b"HTTP/1.1 200")
                self.samples.new_connection_ms.append((time.perf_counter() - started) * 1000)
                self.samples.live_failures += not ok
            except OSError:
                self.samples.live_failures += 1
            self.stop.wait(max(0.0, 0.25 - (time.perf_counter() - started)))


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def measure(
    server: Server, body_file: Path, *, seconds: float, concurrency: int
) -> tuple[HeyResult, Samples]:
    sampler = Sampler(server, body_file.read_bytes())
    sampler.start()
    cpu_before = server.cpu_seconds()
    try:
        result = run_hey(f"{server.url}/predict", body_file, seconds=seconds, concurrency=concurrency)
    finally:
        sampler.join()
    result.server_cpu_s = server.cpu_seconds() - cpu_before
    return result, sampler.samples


@dataclass
class LoopRun:
    loop: str
    rows: list[tuple[str, HeyResult, Samples]]
    capacity_rps: float
    idle_rss: int
    final_rss: int
    after_status: int
    ready_status: int


def run_loop(loop: str, work: Path, model: Path, body: Path, args: argparse.Namespace) -> LoopRun:
    """One server on ``loop``: capacity, then each overload level."""
    server = start_kiln(work / f"store-{loop}", env={"KILN_EVENT_LOOP": loop})
    rows: list[tuple[str, HeyResult, Samples]] = []
    try:
        upload(
            server, model, "wide", max_batch_size=MAX_BATCH, max_queue_size=QUEUE_SIZE, max_queue_delay_ms=2
        )
        idle_rss = psutil.Process(server.process.pid).memory_info().rss
        capacity, samples = measure(server, body, seconds=args.seconds, concurrency=args.capacity_concurrency)
        rows.append((f"{args.capacity_concurrency} (capacity)", capacity, samples))
        for level in (int(c) for c in args.concurrency.split(",")):
            result, samples = measure(server, body, seconds=args.seconds, concurrency=level)
            rows.append((str(level), result, samples))
        with httpx.Client(base_url=server.url, timeout=10) as client:
            after = client.post(
                "/predict", content=body.read_bytes(), headers={"Content-Type": "application/json"}
            )
            ready = client.get("/health/ready").status_code
        final_rss = psutil.Process(server.process.pid).memory_info().rss
    finally:
        server.stop()
    return LoopRun(
        loop,
        rows,
        capacity.statuses.get(200, 0) / capacity.seconds,
        idle_rss,
        final_rss,
        after.status_code,
        ready,
    )


def report(run: LoopRun) -> None:
    print(f"\nevent loop {run.loop}: capacity {run.capacity_rps:.0f} answered req/s")
    print(
        f"{'hey -c':>15} {'sent/s':>7} {'x cap':>6} {'200/s':>6} {'503 %':>6} {'other':>5} {'errors':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'live p50':>8} {'live p99':>8} {'live max':>8} "
        f"{'new-conn p50':>12} {'new-conn max':>12} {'live fail':>9} {'503 no RA':>9} {'RSS max MB':>10} "
        f"{'CPU us/req':>10}"
    )
    for label, result, samples in run.rows:
        ok = result.statuses.get(200, 0)
        refused = result.statuses.get(503, 0)
        other = sum(n for code, n in result.statuses.items() if code not in (200, 503))
        sent = result.total / result.seconds
        print(
            f"{label:>15} {sent:>7.0f} {sent / run.capacity_rps:>6.1f} {ok / result.seconds:>6.0f} "
            f"{100 * refused / max(result.total, 1):>6.1f} {other:>5} {sum(result.errors.values()):>6} "
            f"{result.p50_ms:>7.1f} {result.p99_ms:>7.1f} "
            f"{percentile(samples.live_ms, 50):>8.1f} {percentile(samples.live_ms, 99):>8.1f} "
            f"{max(samples.live_ms, default=float('nan')):>8.1f} "
            f"{percentile(samples.new_connection_ms, 50):>12.1f} "
            f"{max(samples.new_connection_ms, default=float('nan')):>12.1f} "
            f"{samples.live_failures:>9} {samples.probe_503_without_retry_after:>9} "
            f"{max(samples.rss_bytes, default=0) / 2**20:>10.0f} "
            f"{result.server_cpu_s / max(result.total, 1) * 1e6:>10.0f}"
        )
        if result.errors:
            print(f"{'':>15} errors: {result.errors}")
    print(
        f"RSS idle {run.idle_rss / 2**20:.0f} MB, at the end {run.final_rss / 2**20:.0f} MB; after the "
        f"overload: POST /predict {run.after_status}, GET /health/ready {run.ready_status}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--capacity-concurrency", type=int, default=8)
    parser.add_argument("--concurrency", default="64,256,512", help="comma-separated hey concurrencies")
    parser.add_argument("--loops", default="uvloop,asyncio", help="event loops to compare (KILN_EVENT_LOOP)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-overload-"))
    model = wide_mlp(work / "wide.onnx")
    body = work / "body.json"
    row = np.random.default_rng(1).standard_normal(WIDTH).astype(np.float32).round(4).tolist()
    body.write_text(json.dumps({"engine": "wide", "inputs": [row]}))
    runs = [run_loop(loop, work, model, body, args) for loop in args.loops.split(",")]
    print(
        f"wide MLP {WIDTH}->{HIDDEN}x3->{WIDTH}, max_batch_size {MAX_BATCH}, max_queue_size {QUEUE_SIZE}, "
        f"hey -z {args.seconds:g}s -t 10 per level; health sampled every 50 ms (kept-alive) and "
        "250 ms (new connection); ms"
    )
    for run in runs:
        report(run)


if __name__ == "__main__":
    main()
