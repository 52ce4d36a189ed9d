"""Running the app under uvicorn with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT, readiness turns false and new inference requests
get 503 while queued and running ones finish (up to ``drain_timeout_s``); then
uvicorn stops and the lifespan closes engines. A second signal stops at once.

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
from uvicorn.config import LOGGING_CONFIG

from service.app import create_app
from service.settings import Settings
from service.state import AppState

log = logging.getLogger("kiln.server")

AFTER_DRAIN_S = 5
"""Seconds uvicorn waits for open responses once the drain ended."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
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
        # The handler runs inside whatever callback the signal interrupted, maybe one
        # of a request's: start the drain in an empty context, not with that request's id.
        contextvars.Context().run(self._start_drain, state, sig)

    def _start_drain(self, state: AppState, sig: int) -> None:
        log.info("signal %d: draining for up to %.0f s", sig, self.settings.drain_timeout_s)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit(state))

    async def _drain_then_exit(self, state: AppState) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline:
            busy = any(v.batcher is not None and v.batcher.busy for v in state.registry.all_versions())
            if not busy:
                break
            await asyncio.sleep(0.02)
        # Responses of the last batches are still being written: give them a moment.
        await asyncio.sleep(0.1)
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
    config = uvicorn.Config(
        create_app(settings),
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
    DrainingServer(config, settings).run()
