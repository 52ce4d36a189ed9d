"""One replica of a cluster: its local registry is a cache that follows the catalog.

Level-triggered: every pass compares the whole catalog with what this replica
holds and fixes the difference (adopt new versions, unload removed ones, report
what it serves), so a missed notification costs at most one resync interval.
Passes run on a notification (LISTEN) or every ``KILN_CATALOG_RESYNC_S``.

Engines are obtained through the catalog: a committed build is loaded as it is;
otherwise one replica per engine cache key builds it under a lease that it
renews every ttl/3, and commits it fenced by the lease's generation. The others
wait for the commit. While the database is away nothing loaded stops serving;
passes fail with ``CatalogUnavailable`` and catch up when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.errors import StoreCorrupted
from engines.store import EngineStore
from service.catalog.base import (
    Allocation,
    BuildLease,
    BuildState,
    BuildStatus,
    CatalogState,
    CatalogUnavailable,
    NewVersion,
)
from service.catalog.postgres import PostgresCatalog
from service.errors import NotFound
from service.lifecycle.jobs import BuildFailure
from service.lifecycle.states import VersionState
from service.metrics import CatalogMetrics

if TYPE_CHECKING:
    from service.lifecycle.manager import EngineManager
    from service.lifecycle.registry import EngineVersion

log = logging.getLogger("kiln.cluster")

# Failures that would fail on any replica: stored, not retried elsewhere.
DETERMINISTIC_FAILURES = frozenset(
    {"invalid_model", "unsupported_model", "invalid_calibration", "accuracy_rejected", "build_failed"}
)
GC_LEASE = "gc"


def new_replica_id() -> str:
    """Unique per process start: a restarted pod is a new replica (its old row expires)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterReplica:
    def __init__(
        self,
        catalog: PostgresCatalog,
        manager: EngineManager,
        metrics: CatalogMetrics,
        *,
        resync_s: float,
        gc_grace_s: float,
    ) -> None:
        self.catalog = catalog
        self.manager = manager
        self.metrics = metrics
        self.resync_s = resync_s
        self.gc_grace_s = gc_grace_s
        self.wake = asyncio.Event()
        self._waiters: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_sync = time.monotonic()
        self._last_gc = 0.0
        self._unavailable_reason: str | None = None
        metrics.reconcile_lag.set_function(lambda: time.monotonic() - self._last_sync)

    @property
    def replica_id(self) -> str:
        return self.catalog.replica_id

    # -- running ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect, migrate, and adopt every version in the catalog (their loads run in
        the background; readiness waits for those ready elsewhere, as for a restore).
        Raises ``CatalogUnavailable`` when the database cannot be reached."""
        await self.catalog.start()
        await self.reconcile(starting=True)
        self.manager.restored = True
        for coro in (self.catalog.changes(self._on_change), self._loop()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(CatalogUnavailable, TimeoutError):  # else the row expires
            await asyncio.wait_for(self.catalog.leave(), 2)
        await self.catalog.close()

    def _on_change(self) -> None:
        self.wake.set()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until the next notification, or ``timeout_s`` (leases expire silently)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            self._waiters.discard(waiter)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.resync_s)
            self.wake.clear()
            try:
                await self.reconcile()
                await self._maybe_collect_garbage()
            except CatalogUnavailable as exc:
                self.metrics.up.set(0)
                if self._unavailable_reason != exc.message:
                    log.warning("%s", exc.message)
                self._unavailable_reason = exc.message
            except Exception:
                log.exception("reconcile pass failed")

    # -- reconcile ---------------------------------------------------------------

    async def register(
        self,
        name: str,
        model_sha256: str,
        model_filename: str,
        options: dict[str, Any],
        batching: dict[str, Any],
        progressive: bool,
    ) -> Allocation:
        """A new version in the catalog (numbered and pruned there); others hear of it."""
        allocation = await self.catalog.create_version(
            NewVersion(name, model_sha256, model_filename, options, batching, progressive),
            self.manager.settings.max_versions_per_engine,
        )
        self.wake.set()
        return allocation

    async def reconcile(self, *, starting: bool = False) -> None:
        """One full pass: make this replica hold exactly the catalog's versions."""
        desired = {record.key: record for record in await self.catalog.versions()}
        registry = self.manager.registry
        for record in desired.values():
            self.manager.adopt(record, restoring=starting and record.state == CatalogState.READY)
        for version in registry.all_versions():
            if (version.name, version.version) not in desired and version.state != VersionState.UNLOADING:
                log.info("version %s v%d was removed from the catalog; unloading it", *version_key(version))
                self.manager.unload(version)
        for key, record in desired.items():
            local = _find(registry, key)
            if local is None or record.state != CatalogState.PENDING:
                continue
            if local.state in (VersionState.READY, VersionState.FALLBACK):  # served
                await self._set_catalog_state(local, CatalogState.READY, None)
            elif (
                local.state == VersionState.FAILED
                and (local.error or {}).get("type") in DETERMINISTIC_FAILURES
            ):
                await self._set_catalog_state(local, CatalogState.FAILED, local.error)
        loaded = {f"{v.name}/{v.version}": str(v.state) for v in registry.all_versions()}
        await self.catalog.heartbeat(self.manager.device.key(), loaded)
        self._report(await self.catalog.live_replicas())
        if self._unavailable_reason is not None:
            log.info("the catalog is reachable again; caught up with it")
        self._unavailable_reason = None
        self.metrics.up.set(1)
        self._last_sync = time.monotonic()

    async def _set_catalog_state(self, version: EngineVersion, state: str, error: Any) -> None:
        max_versions = self.manager.settings.max_versions_per_engine
        pruned = await self.catalog.set_version_state(
            version.name, version.version, state, error, max_versions
        )
        if pruned:
            self.wake.set()

    def _report(self, replicas: dict[str, dict[str, str]]) -> None:
        ready: dict[str, int] = {}
        for loaded in replicas.values():
            for key, state in loaded.items():
                ready[key] = ready.get(key, 0) + (state == "ready")
        self.metrics.replicas_ready.clear()
        for key, count in ready.items():
            name, _, version = key.rpartition("/")
            self.metrics.replicas_ready.labels(name, version).set(count)

    # -- engines ---------------------------------------------------------------

    async def is_committed(self, version: EngineVersion) -> bool:
        """Whether the engine of ``version`` is built already (False while unreachable)."""
        try:
            status = await self.catalog.build_status(version.cache_key)
        except CatalogUnavailable:
            return False
        return status is not None and status.state == BuildState.COMMITTED

    async def obtain_engine(self, version: EngineVersion) -> dict[str, Any]:
        """The committed engine for ``version.cache_key``: loaded as committed, built here
        under the lease, or waited for while another replica builds it. Raises
        ``BuildFailure`` for a failed build or a version unloaded meanwhile."""
        waited_for_another = False
        while True:
            if version.state not in (VersionState.BUILDING, VersionState.BASELINE):
                raise BuildFailure("cancelled", "the version was removed")
            try:
                outcome = await self.catalog.acquire_build(
                    version.cache_key, version.model_sha256, version.options.to_dict()
                )
            except CatalogUnavailable:
                version.phase = "waiting for the catalog"
                await asyncio.sleep(min(self.resync_s, 1.0))
                continue
            if isinstance(outcome, BuildLease):
                if outcome.took_over:
                    self.metrics.lease_takeovers.inc()
                    log.warning("took over the expired build lease of %s", version.cache_key[:16])
                meta = await self._build_under_lease(version, outcome)
                if meta is not None:
                    self.manager.metrics.builds.labels("succeeded").inc()
                    return meta
                continue  # fenced out: the winner's commit is read on the next turn
            if outcome.state == BuildState.COMMITTED and outcome.meta is not None:
                try:
                    await asyncio.to_thread(
                        self.manager.store.verify_artifact, version.cache_key, outcome.meta
                    )
                except StoreCorrupted as exc:
                    log.warning("%s; building it again", exc.message)
                    await self.catalog.invalidate_build(version.cache_key, outcome.meta["artifact_sha256"])
                    continue
                if waited_for_another:
                    self.metrics.builds_skipped.inc()
                else:
                    self.manager.metrics.builds.labels("cached").inc()
                return dict(outcome.meta)
            if outcome.state == BuildState.FAILED:
                error = outcome.error or {}
                raise BuildFailure(
                    error.get("type", "build_failed"), error.get("message", "the build failed")
                )
            waited_for_another = waited_for_another or outcome.holder != self.replica_id
            version.phase = f"waiting for the build on replica {outcome.holder}"
            await self.wait_for_change(self.catalog.lease_ttl_s / 3)

    async def _build_under_lease(self, version: EngineVersion, lease: BuildLease) -> dict[str, Any] | None:
        """Build, then commit fenced by the lease. None when the lease was lost."""
        manager = self.manager
        job_id = f"{version.name}-v{version.version}-lease{lease.generation}"
        job = manager.build_job(version, temp_owner=self.replica_id, write_commit_point=False)
        renewal = asyncio.create_task(self._renew(lease, job_id))
        started = time.monotonic()
        try:
            meta = await manager.builds.run(job, manager.progress_handler(version), job_id=job_id)
        except BuildFailure as failure:
            if renewal.done() and not renewal.result():
                return None  # the lease is another's now: its build decides
            manager.metrics.builds.labels("failed").inc()
            deterministic = failure.kind in DETERMINISTIC_FAILURES
            # Unrecorded, the lease expires and another replica tries again.
            with contextlib.suppress(CatalogUnavailable):
                await self.catalog.fail_build(lease, failure.to_dict(), deterministic=deterministic)
            raise
        finally:
            renewal.cancel()
        manager.metrics.build_duration.observe(time.monotonic() - started)
        if await self._commit(lease, meta):
            return meta
        self.metrics.commits_refused.inc()
        status = await self.catalog.build_status(version.cache_key)
        winner = _folder((status.meta or {}).get("artifact")) if status else None
        mine = _folder(meta["artifact"])
        if mine is not None and winner != mine:
            await asyncio.to_thread(manager.store.remove_artifact, version.cache_key, mine)
        log.warning(
            "commit of %s refused: its build lease passed to another replica; removed %s",
            version.cache_key[:16],
            f"its files {mine}" if winner != mine else "nothing (the winner's files are byte-identical)",
        )
        return None

    async def _commit(self, lease: BuildLease, meta: dict[str, Any]) -> bool:
        deadline = time.monotonic() + self.catalog.lease_ttl_s
        while True:
            try:
                return await self.catalog.commit_build(lease, meta)
            except CatalogUnavailable:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.5)

    async def _renew(self, lease: BuildLease, job_id: str) -> bool:
        """Renew every ttl/3 while the build runs; a lost lease stops the build."""
        while True:
            await asyncio.sleep(self.catalog.lease_ttl_s / 3)
            try:
                if await self.catalog.renew_build(lease):
                    continue
            except CatalogUnavailable:
                continue  # it may come back before the lease expires
            log.warning("lost the build lease of %s; stopping the build", lease.cache_key[:16])
            self.manager.builds.cancel(job_id)
            return False

    # -- garbage ---------------------------------------------------------------

    async def _maybe_collect_garbage(self) -> None:
        interval = max(self.resync_s * 6, 30.0)
        if time.monotonic() - self._last_gc < interval:
            return
        self._last_gc = time.monotonic()
        if await self.catalog.try_lease(GC_LEASE):
            removed = await collect_garbage(self.catalog, self.manager.store, self.gc_grace_s)
            if removed:
                log.info("garbage collection removed %d store entries", removed)


async def collect_garbage(catalog: PostgresCatalog, store: EngineStore, grace_s: float) -> int:
    """Remove what no version references and no live lease covers, once older than
    ``grace_s``: temp dirs of replicas whose heartbeat expired, engines of no version,
    artifacts that lost their commit, models and data sets of no version. Call it
    under the ``gc`` lease. Returns how many entries were removed. The store is
    walked and pruned off the event loop."""
    removed = 0
    for replica in await catalog.forget_expired_replicas():
        await asyncio.to_thread(store.remove_temp_dir, _safe_owner(replica))
        removed += 1
    live = set(await catalog.live_replicas())
    removed += await asyncio.to_thread(_collect_temp_dirs, store, live, grace_s)
    for build in await catalog.unreferenced_builds(grace_s):
        await asyncio.to_thread(store.discard_engine, build.cache_key)
        await catalog.forget_build(build.cache_key)
        removed += 1
    builds = {build.cache_key: build for build in await catalog.builds()}
    removed += await asyncio.to_thread(_collect_engines, store, builds, grace_s)
    versions = await catalog.versions()
    models = {v.model_sha256 for v in versions}
    data = {
        sha
        for v in versions
        for sha in (v.options.get("calibration_sha256"), v.options.get("validation_sha256"))
        if sha
    }
    removed += await asyncio.to_thread(_collect_models_and_data, store, models, data, grace_s)
    return removed


def _collect_temp_dirs(store: EngineStore, live: set[str], grace_s: float) -> int:
    removed = 0
    for owner in store.temp_owners():
        if owner not in live and _older_than(store.root / "tmp" / owner, grace_s):
            store.remove_temp_dir(owner)
            removed += 1
    return removed


def _collect_engines(store: EngineStore, builds: dict[str, BuildStatus], grace_s: float) -> int:
    removed = 0
    for directory in sorted((store.root / "engines").iterdir()):
        if directory.name not in builds:
            if _older_than(directory, grace_s):
                store.discard_engine(directory.name)
                removed += 1
            continue
        build = builds[directory.name]
        keep = _folder((build.meta or {}).get("artifact")) if build.state == BuildState.COMMITTED else None
        for artifact in directory.glob("engine-*"):
            if (
                artifact.name != keep
                and build.state != BuildState.BUILDING
                and _older_than(artifact, grace_s)
            ):
                store.remove_artifact(directory.name, artifact.name)
                removed += 1
    return removed


def _collect_models_and_data(store: EngineStore, models: set[str], data: set[str], grace_s: float) -> int:
    removed = 0
    for model in (store.root / "models").iterdir():  # <sha>.onnx, or a package <sha>/
        if model.stem not in models and _older_than(model, grace_s):
            store.remove_model(model.stem)
            removed += 1
    for blob in (store.root / "data").iterdir():
        if blob.stem not in data and _older_than(blob, grace_s):
            blob.unlink(missing_ok=True)
            removed += 1
    return removed


def version_key(version: EngineVersion) -> tuple[str, int]:
    return (version.name, version.version)


def _find(registry: Any, key: tuple[str, int]) -> EngineVersion | None:
    try:
        found: EngineVersion = registry.get(*key)
    except NotFound:
        return None
    return found


def _folder(artifact: str | None) -> str | None:
    """The ``engine-<hash>`` directory of an artifact path (``engine-<hash>/engine.onnx``)."""
    return artifact.split("/", 1)[0] if artifact else None


def _older_than(path: Path, grace_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > grace_s
    except OSError:
        return False


def _safe_owner(replica_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", replica_id)[:64]
