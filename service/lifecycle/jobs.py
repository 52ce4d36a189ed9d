"""Build jobs in child processes.

A build can crash (a segfault in a backend), hang, or run out of memory; none of
that may take the server down. So every build runs ``engines.build.run_build``
in its own spawned process, with a timeout, inside one of ``workers`` slots that
the caller takes first (``slot``: in a cluster, before the build's lease, so a
replica never holds leases it has no slot to build). The child reports phases
and progress through a pipe; a child that dies without answering fails only its
own build, with the exit reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any

from engines.build import BuildJob, run_build
from engines.errors import EngineError

log = logging.getLogger("kiln.jobs")

ProgressHandler = Callable[[str, float], None]


class BuildFailure(Exception):
    """A build that did not produce an engine; ``kind`` and ``message`` are for users.
    ``final``: the catalog recorded it as failed for good (nothing to retry here)."""

    def __init__(
        self, kind: str, message: str, details: dict[str, Any] | None = None, *, final: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details or {}
        self.final = final

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error


PARENT_CHECK_INTERVAL_S = 0.5


def exit_when_orphaned(parent_pid: int) -> None:
    """Daemon thread of a build process: exit at once if the server is gone.

    A server killed with SIGKILL cannot stop its builds; without this they would
    run on, orphaned, and keep writing into a store that a restarted server is
    cleaning up. ``os._exit`` skips cleanup on purpose: the build's temp files
    are the next start-up's to remove."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(70)
        time.sleep(PARENT_CHECK_INTERVAL_S)


def _child_main(job: BuildJob, conn: Connection, parent_pid: int | None = None) -> None:
    """Entry point of a build process: run the build, send one final message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C, not its builds
    if parent_pid is not None:
        threading.Thread(
            target=exit_when_orphaned, args=(parent_pid,), name="parent-watch", daemon=True
        ).start()

    def progress(phase: str, fraction: float) -> None:
        conn.send(("progress", phase, float(fraction)))

    try:
        meta = run_build(job, progress)
        conn.send(("done", meta))
    except EngineError as exc:
        conn.send(("error", exc.kind, exc.message, exc.details))
    except MemoryError:
        conn.send(("error", "build_failed", "the build ran out of memory", {}))
    except Exception as exc:
        conn.send(
            (
                "error",
                "build_failed",
                f"the build crashed: {type(exc).__name__}: {exc}",
                {"traceback": traceback.format_exc(limit=8)},
            )
        )
    finally:
        conn.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the build process did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (killed: out of memory, or stopped by an operator)" if name == "SIGKILL" else ""
        return f"the build process was terminated by {name}{hint}"
    return f"the build process exited with code {exitcode} without a result"


class BuildRunner:
    """Runs ``BuildJob``s in spawned processes, ``workers`` at a time."""

    def __init__(self, workers: int = 1, timeout_s: float = 1800.0) -> None:
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(workers)
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[str, Any] = {}
        self._jobs: set[str] = set()  # queued or running
        self._cancelled: set[str] = set()  # a subset of _jobs
        self._closing = False

    @property
    def active(self) -> int:
        return len(self._processes)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the ``workers`` build slots, held for the block; ``run`` inside it."""
        async with self._slots:
            yield

    async def run(self, job: BuildJob, on_progress: ProgressHandler, *, job_id: str) -> dict[str, Any]:
        """Run one build (the caller holds a ``slot``); returns the engine metadata or
        raises ``BuildFailure``.

        ``on_progress`` is called on the event loop. ``job_id`` names the job for
        ``cancel``; it must be unique among the jobs running.
        """
        if job_id in self._jobs:
            raise ValueError(f"a build job named {job_id!r} is already queued or running")
        self._jobs.add(job_id)
        try:
            if self._closing:
                raise BuildFailure("cancelled", "the build was cancelled before it started")
            loop = asyncio.get_running_loop()

            def forward(phase: str, fraction: float) -> None:
                loop.call_soon_threadsafe(on_progress, phase, fraction)

            return await asyncio.to_thread(self._supervise, job, forward, job_id)
        finally:
            self._jobs.discard(job_id)
            self._cancelled.discard(job_id)

    def _supervise(self, job: BuildJob, progress: ProgressHandler, job_id: str) -> dict[str, Any]:
        """Blocking: start the child, relay its messages, enforce the timeout."""
        parent_conn, child_conn = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(job, child_conn, os.getpid()),
            name=f"kiln-build-{job_id}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self._processes[job_id] = process
        if job_id in self._cancelled:  # cancelled while the process started
            self._kill(process)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill(process)
                    raise BuildFailure(
                        "timeout", f"the build took longer than {self.timeout_s:.0f} s and was stopped"
                    )
                if not parent_conn.poll(min(remaining, 0.5)):
                    if not process.is_alive() and not parent_conn.poll(0):
                        process.join(1)
                        raise self._died(job_id, process.exitcode)
                    continue
                try:
                    message = parent_conn.recv()
                except (EOFError, OSError):
                    process.join(5)
                    raise self._died(job_id, process.exitcode) from None
                if message[0] == "progress":
                    progress(message[1], message[2])
                elif message[0] == "done":
                    process.join(10)
                    return dict(message[1])
                elif message[0] == "error":
                    process.join(10)
                    raise BuildFailure(message[1], message[2], message[3])
        finally:
            parent_conn.close()
            if process.is_alive():
                self._kill(process)
            self._processes.pop(job_id, None)

    def _died(self, job_id: str, exitcode: int | None) -> BuildFailure:
        if job_id in self._cancelled:
            return BuildFailure("cancelled", "the build was cancelled")
        return BuildFailure("build_crashed", _exit_reason(exitcode))

    @staticmethod
    def _kill(process: Any) -> None:
        process.terminate()
        process.join(3)
        if process.is_alive():
            process.kill()
            process.join(3)

    def cancel(self, job_id: str) -> None:
        """Stop a running build; its ``run`` raises ``BuildFailure``. Unknown or
        finished jobs are left alone."""
        if job_id not in self._jobs:
            return
        self._cancelled.add(job_id)
        process = self._processes.get(job_id)
        if process is not None:
            threading.Thread(target=self._kill, args=(process,), daemon=True).start()

    async def shutdown(self) -> None:
        """Stop every running build (they are marked failed and can be retried)."""
        self._closing = True
        for job_id in list(self._processes):
            self.cancel(job_id)
        for _ in range(100):
            if not self._processes:
                break
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            for process in list(self._processes.values()):
                process.kill()
