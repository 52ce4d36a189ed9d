"""The one inference path behind every protocol: resolve the engine version,
check the feeds, queue them on its batcher, and count the request.

Protocol routes decode their own body into numpy feeds, then call ``infer``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from engines.errors import EngineError
from engines.types import Signature
from service.errors import BadRequest, PayloadTooLarge, ServiceError, Unavailable, status_of
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

    def admit(self, version: EngineVersion) -> Signature:
        """Count the request under a ready ``version`` and refuse it now if its queue
        is full (before decoding: overload stays cheap). Returns its signature."""
        self.engine = version.name
        self.version = str(version.version)
        assert version.signature is not None and version.batcher is not None
        version.batcher.check_capacity()
        return version.signature

    def __enter__(self) -> RequestMetrics:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is None:
            self.code = 200
        elif isinstance(exc, ServiceError | EngineError):
            self.code = status_of(exc)[0]
        self.finish()

    def finish(self) -> None:
        if not self.engine:
            return  # unknown engines would let clients create label values at will
        metrics = self.state.metrics
        metrics.requests.labels(self.engine, self.version, self.protocol, str(self.code)).inc()
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


async def read_body(receive: Callable[[], Awaitable[Any]], limit: int, declared: str | None) -> bytes:
    """The whole body from the ASGI ``receive`` callable, refused with 413 as soon as
    it passes ``limit`` bytes (``declared`` is the Content-Length header, if any)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
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
    disconnected: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run ``feeds`` on a ready version's batcher. Raises ``InvalidInput`` for feeds
    that don't fit, and the batcher's errors (503, 504, the engine's own).
    ``disconnected`` (see ``disconnect_waiter``) lets a gone client leave the queue."""
    assert version.runner is not None and version.batcher is not None
    version.runner.check_feeds(feeds)
    return await version.batcher.infer(feeds, timeout_ms=timeout_ms, disconnected=disconnected)
