"""An open-loop HTTP load generator: Poisson arrivals that keep their schedule.

Production traffic does not slow down when a server does, so each request is sent
at its scheduled time whatever happened to the earlier ones, on a free
keep-alive connection (a new one when all are busy). Latency is measured from the
*scheduled* time, so a generator that falls behind cannot hide the server's
slowness (no coordinated omission), and its own lag (send time minus scheduled
time) is reported.

Raw asyncio protocols on uvloop keep the generator's cost per request to a few
tens of µs; pin it to its own core (``--cpu``), the server to the other.

    python -m benchmarks.open_loop SPEC.json     (prints one JSON result)

The spec: ``{"host", "port", "seconds", "max_connections", "warm_connections",
"cpu", "streams": [{"name", "rate", "path", "body_file", "headers": {...},
"deadline_ms"}]}``. ``"closed": N`` on a stream sends it closed-loop from N
connections instead (each sends again as soon as it is answered): used to measure
capacity, never overload.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_now = time.perf_counter  # uvloop's loop.time() has millisecond resolution


@dataclass
class Stream:
    name: str
    request: bytes
    rate: float
    deadline_s: float
    closed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    ok_latencies: list[float] = field(default_factory=list)
    refusal_latencies: list[float] = field(default_factory=list)
    retry_after: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    retry_after_ms: list[float] = field(default_factory=list)
    in_time: int = 0
    sent: int = 0
    sample_error: str = ""


def build_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def current_stream_has_no_sample(current: tuple[Stream, float] | None) -> bool:
    return current is not None and not current[0].sample_error


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.retry_after = ""
        self.retry_after_ms = -1.0
        self.current: tuple[Stream, float] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are their own classes

    def send(self, stream: Stream, scheduled: float) -> None:
        assert self.transport is not None
        self.current = (stream, scheduled)
        self.transport.write(stream.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
                self.status = int(head[0].split(" ", 2)[1])
                length = 0
                self.retry_after = ""
                self.retry_after_ms = -1.0
                for line in head[1:]:
                    key, _, value = line.partition(":")
                    key = key.lower()
                    if key == "content-length":
                        length = int(value)
                    elif key == "retry-after":
                        self.retry_after = value.strip()
                    elif key == "retry-after-ms":
                        self.retry_after_ms = float(value)
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            if self.status != 200 and current_stream_has_no_sample(self.current):
                assert self.current is not None
                self.current[0].sample_error = bytes(self.buffer[self.need - 300 : self.need]).decode(
                    "latin-1"
                )
            del self.buffer[: self.need]
            self.need = -1
            current, self.current = self.current, None
            if current is not None:
                self.generator.answered(
                    self, current[0], current[1], self.status, self.retry_after, self.retry_after_ms
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.generator.lost(self, exc)


class Generator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.host = spec["host"]
        self.port = int(spec["port"])
        self.seconds = float(spec["seconds"])
        self.max_connections = int(spec.get("max_connections", 1024))
        self.warm_connections = int(spec.get("warm_connections", 32))
        self.streams = [
            Stream(
                s["name"],
                build_request(
                    f"{self.host}:{self.port}",
                    s["path"],
                    Path(s["body_file"]).read_bytes(),
                    s.get("headers", {}),
                ),
                float(s.get("rate", 0)),
                float(s.get("deadline_ms", 1e9)) / 1000,
                int(s.get("closed", 0)),
            )
            for s in spec["streams"]
        ]
        self.idle: list[Connection] = []
        self.connections = 0
        self.opening = 0
        self.backlog: list[tuple[Stream, float]] = []
        self.outstanding = 0
        self.loop = asyncio.get_running_loop()
        self.end = 0.0
        self.all_answered = asyncio.Event()

    async def connect(self) -> Connection | None:
        self.connections += 1
        try:
            _, protocol = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError as exc:
            self.connections -= 1
            self.record_error(None, type(exc).__name__)
            return None
        return protocol

    def record_error(self, stream: Stream | None, kind: str) -> None:
        target = stream or self.streams[0]
        target.errors[kind] = target.errors.get(kind, 0) + 1

    def dispatch(self, stream: Stream, scheduled: float) -> None:
        """Send now on a free connection, or open one; past the connection limit the
        request waits in the generator (its lag grows and is reported)."""
        self.outstanding += 1
        stream.sent += 1
        while self.idle and self.idle[-1].transport is None:
            self.idle.pop()
        if self.idle:
            connection = self.idle.pop()
            stream.lags.append(_now() - scheduled)
            connection.send(stream, scheduled)
        elif self.connections < self.max_connections:
            self.loop.create_task(self._open_and_send(stream, scheduled))
        else:
            self.backlog.append((stream, scheduled))

    async def _open_and_send(self, stream: Stream, scheduled: float) -> None:
        connection = await self.connect()
        if connection is None:
            self.finish_one()
            return
        stream.lags.append(_now() - scheduled)
        connection.send(stream, scheduled)

    def answered(
        self,
        connection: Connection,
        stream: Stream,
        scheduled: float,
        status: int,
        retry: str,
        retry_ms: float,
    ) -> None:
        now = _now()
        latency = now - scheduled
        stream.statuses[status] = stream.statuses.get(status, 0) + 1
        if status == 200:
            stream.ok_latencies.append(latency)
            stream.in_time += latency <= stream.deadline_s
        elif status in (429, 503):
            stream.refusal_latencies.append(latency)
            if status in (429, 503):
                stream.retry_after[retry or "none"] = stream.retry_after.get(retry or "none", 0) + 1
                if retry_ms >= 0:
                    stream.retry_after_ms.append(retry_ms / 1000)
        self.finish_one()
        if stream.closed and now < self.end:
            self.outstanding += 1
            stream.sent += 1
            stream.lags.append(0.0)
            connection.send(stream, now)
            return
        if self.backlog:
            waiting, at = self.backlog.pop(0)
            waiting.lags.append(now - at)
            connection.send(waiting, at)
            return
        self.idle.append(connection)

    def lost(self, connection: Connection, exc: Exception | None) -> None:
        self.connections -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if connection.current is not None:
            stream = connection.current[0]
            self.record_error(stream, "reset" if exc else "closed")
            connection.current = None
            self.finish_one()

    def finish_one(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and _now() >= self.end:
            self.all_answered.set()

    async def run(self) -> float:
        for connection in await asyncio.gather(*(self.connect() for _ in range(self.warm_connections))):
            if connection is not None:
                self.idle.append(connection)
        start = _now() + 0.05
        self.end = start + self.seconds
        rng = np.random.default_rng(int(time.time()))
        arrivals: list[tuple[float, int]] = []
        for index, stream in enumerate(self.streams):
            if stream.closed:
                continue
            count = int(stream.rate * self.seconds * 1.2) + 10
            times = start + np.cumsum(rng.exponential(1 / stream.rate, count))
            arrivals += [(t, index) for t in times.tolist() if t < self.end]
        arrivals.sort()
        await asyncio.sleep(max(0.0, start - _now()))
        for stream in self.streams:
            for _ in range(stream.closed):
                self.dispatch(stream, _now())
        position = 0
        while position < len(arrivals):
            now = _now()
            while position < len(arrivals) and arrivals[position][0] <= now:
                at, index = arrivals[position]
                self.dispatch(self.streams[index], at)
                position += 1
            if position < len(arrivals):
                await asyncio.sleep(max(0.0, arrivals[position][0] - _now()))
        await asyncio.sleep(max(0.0, self.end - _now()))
        elapsed = self.seconds
        if self.outstanding:
            try:
                await asyncio.wait_for(self.all_answered.wait(), 30)
            except TimeoutError:
                for stream in self.streams:
                    stream.errors["unanswered"] = stream.errors.get("unanswered", 0)
                self.record_error(None, f"unanswered:{self.outstanding}")
        return elapsed


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), pct) * 1000)


def summarize(stream: Stream, seconds: float) -> dict[str, Any]:
    return {
        "name": stream.name,
        "rate": stream.rate,
        "sent": stream.sent,
        "seconds": seconds,
        "statuses": {str(k): v for k, v in sorted(stream.statuses.items())},
        "in_time": stream.in_time,
        "errors": stream.errors,
        "retry_after": stream.retry_after,
        "ok_p50_ms": _pct(stream.ok_latencies, 50),
        "ok_p99_ms": _pct(stream.ok_latencies, 99),
        "refusal_p50_ms": _pct(stream.refusal_latencies, 50),
        "refusal_p99_ms": _pct(stream.refusal_latencies, 99),
        "refusal_max_ms": _pct(stream.refusal_latencies, 100),
        "lag_p50_ms": _pct(stream.lags, 50),
        "lag_p99_ms": _pct(stream.lags, 99),
        "lag_max_ms": _pct(stream.lags, 100),
        "sample_error": stream.sample_error,
        "retry_after_ms_p50": _pct(stream.retry_after_ms, 50),
        "retry_after_ms_p99": _pct(stream.retry_after_ms, 99),
    }


def main(argv: list[str] | None = None, on_result: Callable[[str], None] = print) -> None:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    if spec.get("cpu") is not None:
        os.sched_setaffinity(0, {int(spec["cpu"])})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def go() -> list[dict[str, Any]]:
        generator = Generator(spec)
        seconds = await generator.run()
        return [summarize(stream, seconds) for stream in generator.streams]

    on_result(json.dumps(asyncio.run(go())))


if __name__ == "__main__":
    main()
