"""A build runner for lifecycle tests: builds in a thread of the test's process (where
fakes are installed), each held until ``release`` is set, so the phase before the
optimized engine is ready can be watched; ``fail`` makes every build fail,
``fail_next`` the next ones, one failure each."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from engines.build import BuildJob, run_build
from service.lifecycle.jobs import BuildFailure


class HeldBuilds:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.cancelled: list[str] = []
        self.fail: BuildFailure | None = None
        self.fail_next: list[BuildFailure] = []
        self.runs = 0
        self.active = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        yield

    async def run(self, job: BuildJob, on_progress: Any, *, job_id: str) -> dict[str, Any]:
        await asyncio.to_thread(self.release.wait, 30)
        if job_id in self.cancelled:
            raise BuildFailure("cancelled", "the build was cancelled")
        self.runs += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        if self.fail is not None:
            raise self.fail
        return await asyncio.to_thread(run_build, job)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.release.set()

    async def shutdown(self) -> None:
        self.release.set()
