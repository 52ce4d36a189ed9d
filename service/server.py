"""Running the app under uvicorn with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT, readiness turns false, new inference requests get
503 with Retry-After, queued and running ones finish, and every response carries
``Connection: close`` so that no client reuses a connection the server is about
to close. The drain lasts until no request is in flight and none has arrived for
``DRAIN_QUIET_S`` (clients have stopped sending: the load balancer took the pod
out), at most ``drain_timeout_s``; only then does uvicorn close its listener and
the connections left, which are idle. So a request that arrives during the drain
gets a response, never a reset. The lifespan then closes engines. A second
signal stops at once.

A drained shutdown is a normal exit (status 0): uvicorn would otherwise raise
the captured signal again once it has stopped, and the process would end "killed
by SIGTERM" after a clean drain.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG

from service.app import create_app
from service.settings import Settings
from service.state import AppState

log = logging.getLogger("kiln.server")

AFTER_DRAIN_S = 5
"""Seconds uvicorn waits for open responses once the drain ended."""

DRAIN_QUIET_S = 0.5
"""The drain ends once no request has arrived or finished for this long."""


class RequestGate:
    """The outermost ASGI layer: counts HTTP requests in flight and, once the drain
    began, closes each connection after its response (``Connection: close``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self.closing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        self.last_activity = time.monotonic()
        try:
            await self.app(scope, receive, send if not self.closing else _closing(send))
        finally:
            self.in_flight -= 1
            self.last_activity = time.monotonic()

    def quiet(self) -> bool:
        return self.in_flight == 0 and time.monotonic() - self.last_activity >= DRAIN_QUIET_S


def _closing(send: Send) -> Send:
    async def send_with_close(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_with_close


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: Settings, gate: RequestGate) -> None:
        super().__init__(config)
        self.settings = settings
        self.gate = gate
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._draining = True
        app = self.config.loaded_app
        state = _find_state(app)
        if state is None:
            self.should_exit = True
            return
        state.draining = True
        self.gate.closing = True
        # The handler runs inside whatever callback the signal interrupted, maybe one
        # of a request's: start the drain in an empty context, not with that request's id.
        contextvars.Context().run(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        log.info("signal %d: draining for up to %.0f s", sig, self.settings.drain_timeout_s)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline and not self.gate.quiet():
            await asyncio.sleep(0.02)
        if not self.gate.quiet():
            log.warning("drain timeout: %d request(s) still in flight", self.gate.in_flight)
        self.should_exit = True  # not handle_exit: that would re-raise the signal at the end


def _find_state(app: object) -> AppState | None:
    # uvicorn wraps the app in middleware; walk down to the FastAPI app.
    seen = 0
    while app is not None and seen < 10:
        state = getattr(getattr(app, "state", None), "kiln", None)
        if isinstance(state, AppState):
            return state
        app = getattr(app, "app", None)
        seen += 1
    return None


def run_server(settings: Settings) -> None:
    gate = RequestGate(create_app(settings))
    config = uvicorn.Config(
        gate,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # The drain already waited for queued work; what is left is writing the last
        # responses. Keeps the whole shutdown within drain + about 15 s (see OPERATIONS.md).
        timeout_graceful_shutdown=AFTER_DRAIN_S,
        server_header=False,
        loop=settings.event_loop,
        # With JSON logs, uvicorn's own lines go through the root handler as JSON too.
        log_config=None if settings.log_json else LOGGING_CONFIG,
    )
    DrainingServer(config, settings, gate).run()
