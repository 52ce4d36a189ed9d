"""The one inference path behind every protocol: resolve the engine version,
check the feeds, queue them on its batcher, and count the request.

Protocol routes decode their own body into numpy feeds, then call ``infer``.
Refusals are asked for as early as each protocol can: ``RequestMetrics.admit``
before the body is read (v2 REST) or decoded (native, gRPC), with what is known
then, and again once the deadline and priority are read, before any tensor is
decoded. Every request is counted here once, under its final status, and every
refusal under its reason.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from engines.types import Signature
from service.errors import MAPPED_ERRORS, BadRequest, PayloadTooLarge, Unavailable, status_of
from service.lifecycle.registry import EngineVersion
from service.state import AppState


class RequestMetrics:
    """Counts one request under its engine, version, protocol and final status."""

    def __init__(self, state: AppState, protocol: str) -> None:
        self.state = state
        self.protocol = protocol
        self.started = time.perf_counter()
        self.engine = ""
        self.version = ""
        self.code = 500

    def admit(
        self, version: EngineVersion, *, header: tuple[int | None, float | None] | None = None
    ) -> Signature:
        """Count the request under a ready ``version`` and refuse it now if its engine
        would refuse it (stopping, a full queue, a standing queue, a deadline it
        cannot meet), before its body is read or its tensors decoded: overload
        stays cheap. ``header`` is the request's (priority, timeout_ms) once read;
        without it the best case is assumed. Returns the version's signature."""
        self.engine = version.name
        self.version = str(version.version)
        assert version.signature is not None and version.batcher is not None
        if header is None:
            version.batcher.precheck()
        else:
            version.batcher.precheck(priority=header[0], timeout_ms=header[1], header_read=True)
        return version.signature

    def __enter__(self) -> RequestMetrics:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is None:
            self.code = 200
        elif isinstance(exc, MAPPED_ERRORS):
            self.code = status_of(exc)[0]
        self.finish(getattr(exc, "reason", None))

    def finish(self, refused: str | None = None) -> None:
        """Count the request; ``refused`` is the reason it was not run, if it was refused."""
        if not self.engine:
            return  # unknown engines would let clients create label values at will
        metrics = self.state.metrics
        metrics.requests.labels(self.engine, self.version, self.protocol, str(self.code)).inc()
        if refused is not None:
            metrics.rejections.labels(self.engine, self.version, refused).inc()
        elapsed = time.perf_counter() - self.started
        metrics.request_duration.labels(self.engine, self.version, self.protocol).observe(elapsed)
        outcome = "success" if self.code == 200 else "failure"
        metrics.request_outcomes.labels(self.engine, self.version, outcome).observe(elapsed)


def counted(state: AppState, protocol: str) -> RequestMetrics:
    """``with counted(state, "native") as record:`` times and counts the request;
    its status is 200 unless an error escapes."""
    return RequestMetrics(state, protocol)


def check_intake(state: AppState) -> None:
    if state.draining:
        raise Unavailable("the server is shutting down", headers={"Retry-After": "1"})


Body = bytes | bytearray

LARGE_BODY_BYTES = 1 << 20


async def read_body(receive: Callable[[], Awaitable[Any]], limit: int, declared: str | None) -> Body:
    """The whole body from the ASGI ``receive`` callable, refused with 413 as soon as
    it passes ``limit`` bytes (``declared`` is the Content-Length header, if any).
    A large declared body is copied into one buffer as it arrives, so no copy of
    the whole body is ever made in one go on the event loop."""
    expected = int(declared) if declared is not None and declared.isdigit() else None
    if expected is not None and expected > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    buffer = bytearray(expected) if expected is not None and expected > LARGE_BODY_BYTES else None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away while sending the body")
        chunk = message.get("body", b"")
        if size + len(chunk) > limit:
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
        if buffer is not None and size + len(chunk) <= len(buffer):
            buffer[size : size + len(chunk)] = chunk
        else:
            if buffer is not None:  # more than Content-Length said: uvicorn would not pass it on
                chunks.append(bytes(buffer[:size]))
                buffer = None
            chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            if buffer is not None:
                return buffer if size == len(buffer) else buffer[:size]
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def disconnect_waiter(receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
    """A coroutine factory that returns when the client closes the connection
    (``receive`` is the ASGI receive callable, after the body was read)."""

    async def wait() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    return wait


async def infer(
    version: EngineVersion,
    feeds: Mapping[str, np.ndarray],
    *,
    timeout_ms: float | None = None,
    priority: int | None = None,
    disconnected: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run ``feeds`` on a ready version's batcher. Raises ``InvalidInput`` for feeds
    that don't fit (more rows than the engine's batch are fine, up to
    ``KILN_MAX_REQUEST_ROWS``), and the batcher's errors (refusals, a passed
    deadline, the engine's own). ``disconnected`` (see ``disconnect_waiter``) lets a
    gone client leave the queue."""
    assert version.runner is not None and version.batcher is not None
    version.runner.check_feeds(feeds, max_rows=version.batcher.policy.max_request_rows)
    return await version.batcher.infer(
        feeds, timeout_ms=timeout_ms, priority=priority, disconnected=disconnected
    )
