"""Where a version's engine comes from: the catalog's committed build, or a build
run here under the catalog's lease, or one another replica runs.

``EngineSource.obtain`` loops until the build of the version's cache key is
committed (then verifies and returns its metadata) or failed for good:

- committed: its files are checked against their sha256 (a corrupt one is
  invalidated, once, and built again);
- failed: ``BuildFailure`` (a failure the same inputs reproduce, or retries spent);
- building elsewhere: wait for its commit; a lease seen expired for a whole ttl
  (its holder stopped renewing, not merely a database outage) is taken over;
- released after a failed attempt: wait for its backoff;
- free: take a local build slot first, then the lease; build in a child process,
  renew the lease every ttl/3 (a lost lease stops the build), commit fenced by the
  lease's generation, retrying the commit through a database outage until the
  generation says otherwise.

Identical versions (one cache key) share one ``obtain``; it is cancelled, and its
build child stopped, when every version waiting for it is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from engines.build import BuildJob, overall_progress
from engines.errors import StoreCorrupted
from engines.store import EngineStore
from service import tracing
from service.catalog.base import (
    PERMANENT_FAILURES,
    BuildLease,
    BuildState,
    BuildStatus,
    CatalogUnavailable,
    VersionCatalog,
)
from service.lifecycle.jobs import BuildFailure, BuildRunner
from service.lifecycle.registry import EngineVersion
from service.lifecycle.states import WORKING
from service.metrics import CatalogMetrics, KilnMetrics
from service.settings import Settings

log = logging.getLogger("kiln.builds")

MAX_BACKOFF_S = 300.0


def backoff_s(base_s: float, attempts: int) -> float:
    """Seconds before try ``attempts + 1``: ``base_s`` doubled per failed attempt, at most 5 min."""
    return float(min(base_s * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S))


@dataclass(eq=False)
class SharedObtain:
    """One ``obtain`` of a cache key in this process, and the versions waiting for it."""

    cache_key: str
    waiters: set[EngineVersion] = field(default_factory=set)
    task: asyncio.Task[dict[str, Any]] | None = None
    job_id: str | None = None  # while a build child runs here
    # How the engine came: "succeeded" (built here), "cached" (committed already),
    # "skipped" (built by another replica, waited for).
    outcome: str = "cached"
    first: EngineVersion | None = None


class EngineSource:
    def __init__(
        self,
        settings: Settings,
        catalog: VersionCatalog,
        runner: BuildRunner,
        store: EngineStore,
        backend_name: str,
        metrics: KilnMetrics,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.runner = runner
        self.store = store
        self.backend_name = backend_name
        self.metrics = metrics
        self.catalog_metrics: CatalogMetrics = metrics.catalog
        self._shared: dict[str, SharedObtain] = {}
        self._numbers = itertools.count(1)
        self._change = asyncio.Event()

    def notify(self) -> None:
        """The catalog changed: waits for another replica's build look again."""
        self._change.set()

    async def _wait_for_change(self, timeout_s: float) -> None:
        self._change.clear()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
        # that arrives as the event is set.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._change.wait()

    # -- the job ------------------------------------------------------------------

    def build_job(self, version: EngineVersion) -> BuildJob:
        """The build of ``version``'s engine, in this process's temp directory; the
        catalog, not the child, commits it."""
        return BuildJob(
            store_root=str(self.store.root),
            model_sha256=version.model_sha256,
            options=version.options.to_dict(),
            backend=self.backend_name,
            cache_key=version.cache_key,
            batch_sizes=batch_sizes(version),
            backend_kwargs=dict(self.settings.backend_options().get(self.backend_name, {})),
            temp_owner=self.store.temp_owner,
            write_commit_point=False,
        )

    # -- committed engines ------------------------------------------------------------

    async def committed(self, version: EngineVersion) -> dict[str, Any] | None:
        """The engine committed for the version's cache key, verified; None when
        there is none (or the catalog cannot say now)."""
        try:
            status = await self.catalog.build_status(version.cache_key)
        except CatalogUnavailable:
            return None
        if status is None or status.state != BuildState.COMMITTED:
            return None
        return await self._verified(version, status)

    async def _verified(self, version: EngineVersion, status: BuildStatus) -> dict[str, Any] | None:
        assert status.meta is not None
        try:
            await asyncio.to_thread(self.store.verify_artifact, version.cache_key, status.meta)
        except StoreCorrupted as exc:
            log.warning("%s; rebuilding it from the stored model", exc.message)
            with contextlib.suppress(CatalogUnavailable):
                await self.catalog.invalidate_build(version.cache_key, status.meta["artifact_sha256"])
            return None
        return dict(status.meta)

    async def invalidate(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        """Forget a committed engine that does not load, so that ``obtain`` builds it again."""
        await self.catalog.invalidate_build(version.cache_key, meta["artifact_sha256"])

    # -- obtaining --------------------------------------------------------------

    async def obtain(self, version: EngineVersion) -> dict[str, Any]:
        """The committed engine's metadata for ``version``; raises ``BuildFailure``."""
        shared = self._shared.get(version.cache_key)
        if shared is None or shared.task is None or shared.task.done():  # a finished one is not joined
            shared = SharedObtain(version.cache_key, first=version)
            self._shared[version.cache_key] = shared
            shared.task = asyncio.create_task(self._obtain(shared, version))
            shared.task.add_done_callback(lambda task: task.cancelled() or task.exception())
        else:
            version.phase = "waiting for an identical build"
        shared.waiters.add(version)
        try:
            assert shared.task is not None
            meta = await asyncio.shield(shared.task)
            self._count(shared, version)
            return meta
        except asyncio.CancelledError:
            if shared.task is not None and shared.task.cancelled() and version.state not in WORKING:
                raise BuildFailure("cancelled", "the version was removed") from None
            raise
        finally:
            shared.waiters.discard(version)
            if (
                self._shared.get(version.cache_key) is shared
                and shared.task is not None
                and shared.task.done()
            ):
                del self._shared[version.cache_key]

    def _count(self, shared: SharedObtain, version: EngineVersion) -> None:
        """Each version that got its engine counts once: the one a build here ran for
        as built, others waiting beside it as cached, and where another replica built
        it, as skipped."""
        outcome = shared.outcome
        if outcome == "succeeded" and version is not shared.first:
            outcome = "cached"
        if outcome == "skipped":
            self.catalog_metrics.builds_skipped.inc()
        else:
            self.metrics.builds.labels(outcome).inc()

    def release(self, version: EngineVersion) -> None:
        """The version no longer waits (deleted): its build stops unless an identical
        version still waits for it."""
        shared = self._shared.get(version.cache_key)
        if shared is None or version not in shared.waiters:
            return
        shared.waiters.discard(version)
        if shared.waiters:
            return
        # A new upload of the same model starts its own obtain, not this dying one.
        del self._shared[version.cache_key]
        if shared.job_id is not None:
            self.runner.cancel(shared.job_id)  # its build fails as cancelled, releasing the lease
        elif shared.task is not None:
            shared.task.cancel()

    def _progress(self, shared: SharedObtain, spans: tracing.BuildSpans | None) -> Any:
        def on_progress(phase: str, fraction: float) -> None:
            if spans is not None:
                spans.phase(phase)
            for version in shared.waiters:
                if version.state in WORKING:
                    version.phase = phase
                    version.progress = max(
                        version.progress, overall_progress(phase, fraction, version.progress)
                    )

        return on_progress

    def _phase(self, shared: SharedObtain, phase: str) -> None:
        for version in shared.waiters:
            if version.state in WORKING:
                version.phase = phase

    async def _obtain(self, shared: SharedObtain, version: EngineVersion) -> dict[str, Any]:
        key = version.cache_key
        ttl = self.catalog.lease_ttl_s
        waited_for_another = False
        expired: tuple[int, float] | None = None  # (generation, first seen expired)
        while True:
            try:
                status = await self.catalog.build_status(key)
            except CatalogUnavailable:
                self._phase(shared, "waiting for the catalog")
                await asyncio.sleep(min(1.0, ttl / 3))
                continue
            take_over: int | None = None
            if status is not None and status.state == BuildState.COMMITTED:
                meta = await self._verified(version, status)
                if meta is None:
                    continue
                shared.outcome = "skipped" if waited_for_another else "cached"
                return meta
            if status is not None and status.state == BuildState.FAILED:
                error = status.error or {}
                raise BuildFailure(
                    error.get("type", "build_failed"), error.get("message", "the build failed"), final=True
                )
            if status is not None and status.state == BuildState.BUILDING:
                if not status.expired:
                    expired = None
                elif expired is None or expired[0] != status.generation:
                    expired = (status.generation, time.monotonic())
                elif time.monotonic() - expired[1] >= ttl:
                    take_over = status.generation
                if take_over is None:
                    waited_for_another = waited_for_another or status.holder != self.catalog.replica_id
                    self._phase(shared, f"waiting for the build on replica {status.holder}")
                    await self._wait_for_change(ttl / 3)
                    continue
            if status is not None and status.state == BuildState.RELEASED and status.retry_in_s > 0:
                last = (status.error or {}).get("message", "it failed")
                self._phase(
                    shared, f"retrying in {status.retry_in_s:.0f} s (attempt {status.attempts}: {last})"
                )
                await self._wait_for_change(min(status.retry_in_s, ttl / 3))
                continue
            meta = await self._build_here(shared, version, take_over)
            if meta is not None:
                shared.outcome = "succeeded"
                return meta

    async def _build_here(
        self, shared: SharedObtain, version: EngineVersion, take_over: int | None
    ) -> dict[str, Any] | None:
        """Take a build slot, then the lease, and build; None when another replica
        got the lease first or took it over (the loop reads what it did)."""
        async with self.runner.slot():
            try:
                lease = await self.catalog.acquire_build(
                    version.cache_key, version.model_sha256, version.options.to_dict(), take_over=take_over
                )
            except CatalogUnavailable:
                await asyncio.sleep(min(1.0, self.catalog.lease_ttl_s / 3))
                return None
            if isinstance(lease, BuildStatus):
                return None
            if lease.took_over:
                self.catalog_metrics.lease_takeovers.inc()
                log.warning("took over the expired build lease of %s", version.cache_key[:16])
            return await self._build_under_lease(shared, version, lease)

    async def _build_under_lease(
        self, shared: SharedObtain, version: EngineVersion, lease: BuildLease
    ) -> dict[str, Any] | None:
        job_id = f"{version.name}-v{version.version}-build{next(self._numbers)}"
        shared.job_id = job_id
        renewal = asyncio.create_task(self._renew(lease, job_id))
        spans = tracing.build_spans(
            {
                "kiln.engine": version.name,
                "kiln.version": version.version,
                "kiln.cache_key": version.cache_key,
            }
        )
        started = time.monotonic()
        try:
            meta = await self.runner.run(
                self.build_job(version), self._progress(shared, spans), job_id=job_id
            )
        except BuildFailure as failure:
            if spans is not None:
                spans.end(error=f"{failure.kind}: {failure.message}")
            if renewal.done() and not renewal.result():
                return None  # the lease is another's now: its build decides
            if failure.kind == "cancelled":
                await self._release(lease)
                raise
            await self._failed(version, lease, failure)
            return None
        except BaseException:
            await self._release(lease)
            raise
        finally:
            renewal.cancel()
            shared.job_id = None
        if spans is not None:
            spans.end()
        self.metrics.build_duration.observe(time.monotonic() - started)
        if await self._commit(shared, lease, meta):
            return meta
        await self._fenced_out(version, meta)
        return None

    async def _failed(self, version: EngineVersion, lease: BuildLease, failure: BuildFailure) -> None:
        """Record a failed attempt: for good when the same inputs would fail again or
        the retries are spent (raises), else for another try after a backoff."""
        self.metrics.builds.labels("failed").inc()
        attempts = lease.attempts + 1
        retries = self.settings.build_retries
        permanent = failure.kind in PERMANENT_FAILURES
        retry_after = (
            None
            if permanent or attempts > retries
            else backoff_s(self.settings.build_retry_backoff_s, attempts)
        )
        error = failure.to_dict()
        if retry_after is None and attempts > 1:
            error["message"] = f"the build failed {attempts} times; the last time: {failure.message}"
        with contextlib.suppress(CatalogUnavailable):  # unrecorded, the lease expires: tried again
            await self.catalog.fail_build(lease, error, retry_after_s=retry_after)
        if retry_after is None:
            raise BuildFailure(error["type"], error["message"], failure.details, final=True)
        log.warning(
            "build of %s v%d failed (attempt %d of %d), retrying in %.0f s: %s",
            version.name,
            version.version,
            attempts,
            retries + 1,
            retry_after,
            failure.message,
        )

    async def _release(self, lease: BuildLease) -> None:
        with contextlib.suppress(CatalogUnavailable):
            await asyncio.shield(self.catalog.release_build(lease))

    async def _commit(self, shared: SharedObtain, lease: BuildLease, meta: dict[str, Any]) -> bool:
        """Commit, through any database outage: the lease's generation keeps a late
        commit safe, so only the catalog's answer ends the tries."""
        delay = 0.1
        while True:
            try:
                return await self.catalog.commit_build(lease, meta)
            except CatalogUnavailable:
                self._phase(shared, "commit (waiting for the catalog)")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _fenced_out(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        """Our lease passed to another replica: remove our files unless they are the
        committed ones (identical bytes)."""
        self.catalog_metrics.commits_refused.inc()
        try:
            status = await self.catalog.build_status(version.cache_key)
        except CatalogUnavailable:
            status = None
        winner = _folder((status.meta or {}).get("artifact")) if status is not None else None
        mine = _folder(meta["artifact"])
        if mine is not None and winner != mine:
            await asyncio.to_thread(self.store.remove_artifact, version.cache_key, mine)
        log.warning(
            "commit of %s refused: its build lease passed to another replica; removed %s",
            version.cache_key[:16],
            f"its files {mine}" if winner != mine else "nothing (the winner's files are byte-identical)",
        )

    async def _renew(self, lease: BuildLease, job_id: str) -> bool:
        """Renew every ttl/3 while the build runs; a lost lease stops the build."""
        while True:
            await asyncio.sleep(self.catalog.lease_ttl_s / 3)
            try:
                if await self.catalog.renew_build(lease):
                    continue
            except CatalogUnavailable:
                continue  # it may come back before anyone takes the lease over
            log.warning("lost the build lease of %s; stopping the build", lease.cache_key[:16])
            self.runner.cancel(job_id)
            return False

    async def shutdown(self) -> None:
        """Stop obtaining (after the runner stopped the build children)."""
        tasks = [shared.task for shared in self._shared.values() if shared.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def batch_sizes(version: EngineVersion) -> tuple[int, ...]:
    """The batch sizes a build profiles: 1, the maximum and the preferred sizes."""
    options, batching = version.options, version.batching
    sizes = {1, options.max_batch_size, *batching.preferred_batch_sizes}
    return tuple(sorted(size for size in sizes if 1 <= size <= options.max_batch_size))


def _folder(artifact: str | None) -> str | None:
    """The ``engine-<hash>`` directory of an artifact path (``engine-<hash>/engine.onnx``)."""
    return artifact.split("/", 1)[0] if artifact else None
