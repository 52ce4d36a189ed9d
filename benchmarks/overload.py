"""Goodput under overload: open-loop Poisson arrivals at 1x-5x an engine's capacity.

For each model the engine's capacity is measured first (closed loop, enough
connections to keep full batches queued, every answer a 200). Then Poisson
arrivals at ``--levels`` times that capacity, each request with a deadline
(``timeout_ms`` on /predict, ``parameters.timeout`` on v2), from the open-loop
generator (``benchmarks/open_loop.py``) pinned to core 0 while the server is
pinned to core 1. Goodput is the 200s that arrived within their deadline
(measured from their scheduled send time) per second, over the capacity.

Meanwhile a thread here samples ``GET /health/live`` every 50 ms on a kept-alive
connection and the server's RSS. Refusal cost is the server's CPU time not
explained by the 200s (at the CPU per 200 measured at capacity) over the
refusals.

    .venv/bin/python -m benchmarks.overload [--models conv,tiny] [--protocol v2] [--runs 3]
        [--seconds 8] [--levels 1,2,4,5] [--deadline-ms 100] [--env KEY=VALUE ...] [--source DIR]

``--priority`` runs the mixed scenario instead: priority 1 at ``--high`` x capacity
inside a priority-2 flood at ``--levels`` x capacity. ``--env`` sets server
settings (to switch a mechanism off); ``--source`` serves another source tree
(an exported commit) for a before/after comparison. Take figures under the
machine lock (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import Server, start_kiln, upload
from benchmarks.int8_models import CONV_NET_INPUT, conv_net
from tests.models import mlp

GENERATOR_CPU = 0
SERVER_CPU = 1
MAX_BATCH = 8


@dataclass(frozen=True)
class Model:
    name: str
    input_name: str
    row_shape: tuple[int, ...]

    def make(self, path: Path) -> Path:
        if self.name == "tiny":
            return mlp(path, 16, 32, 4)
        # ~5 ms a row on one core of the development machine; batch 8 costs ~8x.
        return conv_net(path, image_size=32, channels=(96, 96, 192, 192))


MODELS = {
    "tiny": Model("tiny", "x", (16,)),
    "conv": Model("conv", CONV_NET_INPUT, (3, 32, 32)),
}


def request_body(
    model: Model, protocol: str, deadline_ms: float, priority: int | None
) -> tuple[bytes, str, dict[str, str]]:
    """(body, path, headers) of one single-row request with its deadline."""
    row = np.random.default_rng(1).standard_normal((1, *model.row_shape)).astype(np.float32)
    if protocol == "native":
        payload: dict[str, Any] = {
            "engine": model.name,
            "inputs": row.round(4).tolist(),
            "timeout_ms": deadline_ms,
        }
        if priority is not None:
            payload["priority"] = priority
        return json.dumps(payload).encode(), "/predict", {"Content-Type": "application/json"}
    parameters: dict[str, Any] = {"timeout": int(deadline_ms * 1000)}
    if priority is not None:
        parameters["priority"] = priority
    header = json.dumps(
        {
            "parameters": parameters,
            "inputs": [
                {
                    "name": model.input_name,
                    "shape": list(row.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": row.nbytes},
                }
            ],
            "outputs": [
                {"name": "y" if model.name == "tiny" else "logits", "parameters": {"binary_data": True}}
            ],
        }
    ).encode()
    return (
        header + row.tobytes(),
        f"/v2/models/{model.name}/infer",
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )


@dataclass
class Probes:
    live_ms: list[float] = field(default_factory=list)
    live_failures: int = 0
    rss_bytes: list[int] = field(default_factory=list)


class Sampler(threading.Thread):
    """GET /health/live every 50 ms on a kept-alive raw socket; RSS every 100 ms."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.probes = Probes()
        self.stop = threading.Event()
        host, port = server.url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.request = f"GET /health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        self.process = psutil.Process(server.process.pid)

    def run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.sock.sendall(self.request)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
                self.probes.live_ms.append((time.perf_counter() - started) * 1000)
                self.probes.live_failures += not data.startswith(b"HTTP/1.1 200")
            except OSError:
                self.probes.live_failures += 1
                return
            if tick % 2 == 0:
                self.probes.rss_bytes.append(self.process.memory_info().rss)
            tick += 1
            self.stop.wait(max(0.0, 0.05 - (time.perf_counter() - started)))
        self.sock.close()


def generate(
    server: Server, streams: list[dict[str, Any]], seconds: float, work: Path
) -> list[dict[str, Any]]:
    """Run the open-loop generator (pinned to GENERATOR_CPU) and return its per-stream results."""
    host, port = server.url.removeprefix("http://").split(":")
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "host": host,
                "port": int(port),
                "seconds": seconds,
                "cpu": GENERATOR_CPU,
                "max_connections": 2048,
                "warm_connections": 256,
                "streams": streams,
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.open_loop", str(spec)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if done.returncode:
        raise RuntimeError(f"the load generator failed:\n{done.stderr}")
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@dataclass
class Level:
    label: str
    offered: float
    streams: list[dict[str, Any]]
    cpu_s: float
    probes: Probes


def run_level(server: Server, label: str, streams: list[dict[str, Any]], seconds: float, work: Path) -> Level:
    sampler = Sampler(server)
    sampler.start()
    cpu_before = server.cpu_seconds()
    try:
        results = generate(server, streams, seconds, work)
    finally:
        sampler.stop.set()
        sampler.join(10)
    return Level(
        label,
        sum(s.get("rate", 0) for s in streams),
        results,
        server.cpu_seconds() - cpu_before,
        sampler.probes,
    )


def stream(
    name: str, body: Path, path: str, headers: dict[str, str], deadline_ms: float, **kw: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "path": path,
        "body_file": str(body),
        "headers": headers,
        "deadline_ms": deadline_ms,
        **kw,
    }


def measure_model(
    model: Model, args: argparse.Namespace, work: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    """One server: capacity, then each level, ``args.runs`` times; one row per (run, level)."""
    server = start_kiln(work / f"store-{model.name}", env=env, cpu=SERVER_CPU, source=args.source)
    rows: list[dict[str, Any]] = []
    try:
        status = upload(server, model.make(work / f"{model.name}.onnx"), model.name, max_batch_size=MAX_BATCH)
        latency = (status.get("report") or {}).get("latency_ms") or {}
        requests: dict[int | str | None, tuple[Path, str, dict[str, str]]] = {}
        for priority in (None, 1, 2, "capacity"):
            # Capacity is measured closed-loop with a deadline that admission never has to keep
            # short: a refused closed-loop client resends at once and measures refusals instead.
            deadline = 10_000 if priority == "capacity" else args.deadline_ms
            body, path, headers = request_body(
                model, args.protocol, deadline, priority if isinstance(priority, int) else None
            )
            file = work / f"{model.name}-{priority}.body"
            file.write_bytes(body)
            requests[priority] = (file, path, headers)
        for run in range(args.runs):
            capacity_level = run_level(
                server,
                "capacity",
                [stream("capacity", *requests["capacity"], args.deadline_ms, closed=2 * MAX_BATCH)],
                args.seconds,
                work,
            )
            result = capacity_level.streams[0]
            capacity = result["statuses"].get("200", 0) / result["seconds"]
            cpu_per_ok = capacity_level.cpu_s / max(result["statuses"].get("200", 0), 1)
            rows.append(row_of(model, run, capacity_level, capacity, cpu_per_ok, latency))
            for factor in (float(x) for x in args.levels.split(",")):
                if args.priority:
                    streams = [
                        stream("low", *requests[2], args.deadline_ms, rate=factor * capacity),
                        stream("high", *requests[1], args.deadline_ms, rate=args.high * capacity),
                    ]
                else:
                    streams = [stream("load", *requests[None], args.deadline_ms, rate=factor * capacity)]
                level = run_level(server, f"{factor:g}x", streams, args.seconds, work)
                rows.append(row_of(model, run, level, capacity, cpu_per_ok, latency))
    finally:
        server.stop()
    return rows


def row_of(
    model: Model, run: int, level: Level, capacity: float, cpu_per_ok: float, latency: dict[str, float]
) -> dict[str, Any]:
    streams = {s["name"]: s for s in level.streams}
    total = {"ok": 0, "in_time": 0, "answers": 0, "refused": 0}
    for s in level.streams:
        ok = s["statuses"].get("200", 0)
        answers = sum(s["statuses"].values())
        total["ok"] += ok
        total["in_time"] += s["in_time"]
        total["answers"] += answers
        total["refused"] += answers - ok
    seconds = level.streams[0]["seconds"]
    refusal_cpu_us = (
        (level.cpu_s - total["ok"] * cpu_per_ok) / total["refused"] * 1e6 if total["refused"] > 50 else None
    )
    live = level.probes.live_ms
    return {
        "model": model.name,
        "run": run,
        "level": level.label,
        "capacity": capacity,
        "batch1_ms": latency.get("1"),
        "offered_x": level.offered / capacity if capacity else 0,
        "goodput_x": total["in_time"] / seconds / capacity if capacity else 0,
        "ok_per_s": total["ok"] / seconds,
        "refused_per_s": total["refused"] / seconds,
        "cpu_us_per_answer": level.cpu_s / max(total["answers"], 1) * 1e6,
        "refusal_cpu_us": refusal_cpu_us,
        "live_p99_ms": float(np.percentile(live, 99)) if live else None,
        "live_failures": level.probes.live_failures,
        "rss_max_mb": max(level.probes.rss_bytes, default=0) / 2**20,
        "streams": streams,
    }


def refused_of(stream: dict[str, Any]) -> int:
    return sum(stream["statuses"].values()) - stream["statuses"].get("200", 0)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Medians over the runs, one line per (model, level, stream)."""
    print(
        f"\nprotocol {args.protocol}, deadline {args.deadline_ms:g} ms, {args.seconds:g} s per level, "
        f"{args.runs} run(s); medians over runs (min-max of goodput in brackets)"
    )
    header = (
        f"{'model':<5} {'level':<8} {'stream':<8} {'cap/s':>6} {'goodput x':>14} {'200/s':>6} "
        f"{'refused/s':>9} "
        f"{'other':>14} {'200 p50':>7} {'200 p99':>7} {'refuse p99':>10} {'refuse max':>10} "
        f"{'Retry-After':>12} {'RA ms p50':>9} "
        f"{'lag p99':>7} {'lag max':>7} {'errors':>6} {'live p99':>8} {'RSS MB':>6} {'CPU us/ans':>10} "
        f"{'refusal us':>10}"
    )
    print(header)
    keys = []
    for row in rows:
        for name in row["streams"]:
            key = (row["model"], row["level"], name)
            if key not in keys:
                keys.append(key)
    for model, level, name in keys:
        matching = [r for r in rows if r["model"] == model and r["level"] == level and name in r["streams"]]
        runs = [r["streams"][name] for r in matching]

        def med(values: list[Any]) -> Any:
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        capacity = med([r["capacity"] for r in matching])
        seconds = runs[0]["seconds"]
        goodputs = [s["in_time"] / seconds / r["capacity"] for s, r in zip(runs, matching, strict=True)]
        other: dict[str, int] = {}
        retry: dict[str, int] = {}
        errors = 0
        for s in runs:
            for code, n in s["statuses"].items():
                if code != "200":
                    other[code] = other.get(code, 0) + n
            for value, n in s["retry_after"].items():
                retry[value] = retry.get(value, 0) + n
            errors += sum(s["errors"].values())
        print(
            f"{model:<5} {level:<8} {name:<8} {_fmt(capacity, 0):>6} "
            f"{_fmt(med(goodputs), 2):>5} [{min(goodputs):.2f}-{max(goodputs):.2f}] "
            f"{_fmt(med([s['statuses'].get('200', 0) / seconds for s in runs]), 0):>6} "
            f"{_fmt(med([refused_of(s) / seconds for s in runs]), 0):>9} "
            f"{','.join(f'{k}:{v}' for k, v in sorted(other.items())) or '-':>14} "
            f"{_fmt(med([s['ok_p50_ms'] for s in runs])):>7} {_fmt(med([s['ok_p99_ms'] for s in runs])):>7} "
            f"{_fmt(med([s['refusal_p99_ms'] for s in runs])):>10} "
            f"{_fmt(max((s['refusal_max_ms'] or 0) for s in runs)):>10} "
            f"{','.join(sorted(retry)) or '-':>12} "
            f"{_fmt(med([s.get('retry_after_ms_p50') for s in runs]), 0):>9} "
            f"{_fmt(med([s['lag_p99_ms'] for s in runs])):>7} "
            f"{_fmt(max((s['lag_max_ms'] or 0) for s in runs)):>7} "
            f"{errors:>6} {_fmt(med([r['live_p99_ms'] for r in matching])):>8} "
            f"{_fmt(max(r['rss_max_mb'] for r in matching), 0):>6} "
            f"{_fmt(med([r['cpu_us_per_answer'] for r in matching]), 0):>10} "
            f"{_fmt(med([r['refusal_cpu_us'] for r in matching]), 0):>10}"
        )
    batch1 = {r["model"]: r["batch1_ms"] for r in rows}
    print(
        "batch-1 latency from the build report (ms): "
        + ", ".join(f"{m} {_fmt(v, 2)}" for m, v in batch1.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--models", default="conv,tiny")
    parser.add_argument("--protocol", choices=("v2", "native"), default="v2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--levels", default="1,2,4,5", help="offered load as multiples of the capacity")
    parser.add_argument("--deadline-ms", type=float, default=100)
    parser.add_argument(
        "--priority", action="store_true", help="priority 1 at --high x inside a priority-2 flood"
    )
    parser.add_argument("--high", type=float, default=1.0)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE server setting")
    parser.add_argument("--source", type=Path, default=None, help="serve this source tree instead")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args()
    os.sched_setaffinity(0, {GENERATOR_CPU})  # this process and the generator: core 0
    env = dict(item.split("=", 1) for item in args.env)
    work = Path(tempfile.mkdtemp(prefix="kiln-overload-"))
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += measure_model(MODELS[name], args, work, env)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    report(rows, args)


if __name__ == "__main__":
    main()
