"""Following the catalog: this process holds exactly the catalog's versions.

Level-triggered: every pass compares the whole catalog with what this process
holds and fixes the difference (follow new versions, unload removed ones, start
again what a ``kiln catalog retry`` or a due backoff says), records what settled
(a version served somewhere: ``ready``; a build failed for good: ``failed``),
reports what it holds and prunes. A missed notification costs at most one resync
interval. Passes run on a change (the catalog's feed), every
``KILN_CATALOG_RESYNC_S``, and one at a time (a delete runs one at once).

The first pass at start-up is the restore: versions the catalog has as ``ready``
make readiness wait until they serve here again.

A heartbeat task reports this process every ttl/3 whatever the passes do, so a
replica that cannot complete a pass (the database away longer than the ttl, a
slow pass) is not taken for dead. Garbage is collected every
``KILN_GC_INTERVAL_S`` under the ``gc`` lease. Every background task is
supervised: one that fails is logged and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from service.catalog.base import (
    CatalogState,
    CatalogUnavailable,
    ReplicaReport,
    VersionCatalog,
    VersionRecord,
    VersionReport,
)
from service.lifecycle.garbage import collect_garbage
from service.lifecycle.manager import EngineManager
from service.lifecycle.states import SERVABLE, VersionState

log = logging.getLogger("kiln.catalog")

GC_LEASE = "gc"


class Reconciler:
    def __init__(self, catalog: VersionCatalog, manager: EngineManager) -> None:
        self.catalog = catalog
        self.manager = manager
        self.settings = manager.settings
        self.metrics = manager.metrics.catalog
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_sync = time.monotonic()
        self._last_gc = time.monotonic()
        self._unavailable_reason: str | None = None
        self._malformed: set[tuple[str, int]] = set()
        manager.changed = self.wake
        self.metrics.reconcile_lag.set_function(lambda: time.monotonic() - self._last_sync)

    # -- running ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the catalog and hold every version it has (their loads run in the
        background; readiness waits for those ready before). Raises
        ``CatalogUnavailable`` when the catalog cannot be reached."""
        await self.catalog.start()
        await self.sync(starting=True)
        self.manager.restored = True
        self._supervise("catalog feed", lambda: self.catalog.changes(self._on_change))
        self._supervise("reconcile loop", self._loop)
        self._supervise("heartbeat", self._heartbeats)

    async def stop(self) -> None:
        """Stop following and leave (the catalog stays open: the caller closes it once
        the builds have stopped)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(CatalogUnavailable, TimeoutError):  # else its row expires
            await asyncio.wait_for(self.catalog.leave(), 2)

    def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def supervised() -> None:
            while True:
                try:
                    await run()
                    log.warning("the %s task ended; starting it again", name)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("the %s task failed; starting it again", name)
                await asyncio.sleep(1.0)

        task = asyncio.create_task(supervised(), name=f"kiln-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake(self) -> None:
        """Run a pass soon (something changed here)."""
        self._wake.set()

    def _on_change(self) -> None:
        self._wake.set()
        self.manager.source.notify()

    async def _loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the event is set, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.catalog_resync_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
                await self._maybe_collect_garbage()
            except CatalogUnavailable as exc:
                self.metrics.up.set(0)
                if self._unavailable_reason != exc.message:
                    log.warning("%s", exc.message)
                self._unavailable_reason = exc.message

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.catalog.lease_ttl_s / 3)
            with contextlib.suppress(CatalogUnavailable):
                await self.catalog.heartbeat(self.manager.device.key(), self._report())

    # -- one pass -----------------------------------------------------------------

    async def sync(self, *, starting: bool = False) -> None:
        """One full pass: hold exactly the catalog's versions, record, report, prune."""
        async with self._lock:
            records = await self.catalog.versions()
            self._follow(records, starting)
            self._retry_due()
            await self._settle(records)
        if self._unavailable_reason is not None:
            log.info("the catalog is reachable again; caught up with it")
        self._unavailable_reason = None
        self.metrics.up.set(1)
        self._last_sync = time.monotonic()

    async def settle(self) -> None:
        """Record, report and prune without following (a process that only builds)."""
        async with self._lock:
            await self._settle(await self.catalog.versions())

    async def _settle(self, records: list[VersionRecord]) -> None:
        await self._record_states({record.key: record for record in records})
        await self.catalog.heartbeat(self.manager.device.key(), self._report())
        self._count_ready(await self.catalog.live_replicas())
        pruned = await self.catalog.prune(self.settings.max_versions_per_engine)
        if pruned:
            log.info("pruned %s", ", ".join(f"{name} v{number}" for name, number in pruned))
            self.wake()  # the next pass unloads them

    def _follow(self, records: list[VersionRecord], starting: bool) -> None:
        manager = self.manager
        for record in records:
            try:
                version = manager.follow(record, restoring=starting and record.state == CatalogState.READY)
            except (KeyError, ValueError, TypeError) as exc:
                if record.key not in self._malformed:
                    log.warning("cannot hold %s v%d (%s); skipping it", record.name, record.version, exc)
                    self._malformed.add(record.key)
                continue
            if record.retries > version.retries:  # ``kiln catalog retry``
                version.retries, version.attempts = record.retries, 0
                manager.retry(version)
        wanted = {record.key for record in records}
        for version in manager.registry.all_versions():
            if (version.name, version.version) not in wanted and version.state != VersionState.UNLOADING:
                log.info("%s v%d was removed from the catalog; unloading it", version.name, version.version)
                manager.unload(version)

    async def _record_states(self, records: dict[tuple[str, int], VersionRecord]) -> None:
        """What settled here, in the catalog: a version served (``ready``), a build
        failed for good (``failed``, with its error)."""
        for version in self.manager.registry.all_versions():
            record = records.get((version.name, version.version))
            if record is None:
                continue
            if (
                version.state in SERVABLE
                and version.batcher is not None
                and record.state != CatalogState.READY
            ):
                await self.catalog.set_version_state(version.name, version.version, CatalogState.READY, None)
            elif (
                version.state == VersionState.FAILED
                and version.final
                and record.state == CatalogState.PENDING
            ):
                await self.catalog.set_version_state(
                    version.name, version.version, CatalogState.FAILED, version.error
                )

    def _retry_due(self) -> None:
        now = time.monotonic()
        for version in self.manager.registry.all_versions():
            if version.retry_at is not None and now >= version.retry_at:
                log.info(
                    "trying %s v%d again (attempt %d)", version.name, version.version, version.attempts + 1
                )
                if not self.manager.retry(version):
                    version.retry_at = None

    def _report(self) -> dict[str, VersionReport]:
        return {
            f"{v.name}/{v.version}": VersionReport(str(v.state), v.error, v.attempts, v.phase)
            for v in self.manager.registry.all_versions()
        }

    def _count_ready(self, replicas: dict[str, ReplicaReport]) -> None:
        ready: dict[str, int] = {}
        for replica in replicas.values():
            for label, report in replica.versions.items():
                ready[label] = ready.get(label, 0) + (report.state == "ready")
        self.metrics.replicas_ready.clear()
        for label, count in ready.items():
            name, _, number = label.rpartition("/")
            self.metrics.replicas_ready.labels(name, number).set(count)

    # -- garbage ---------------------------------------------------------------

    async def _maybe_collect_garbage(self) -> None:
        if time.monotonic() - self._last_gc < self.settings.gc_interval_s:
            return
        self._last_gc = time.monotonic()
        if await self.catalog.try_lease(GC_LEASE):
            removed = await collect_garbage(self.catalog, self.manager.store, self.settings.gc_grace_s)
            if removed:
                log.info("garbage collection removed %d store entries", removed)
