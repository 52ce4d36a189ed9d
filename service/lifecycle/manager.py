"""Engine lifecycle: the versions this process holds, and the one place their state changes.

A version comes from the catalog (``register`` creates it there; ``follow`` holds
one the catalog has), then its task obtains its engine (``builds.EngineSource``:
committed, built here under the catalog's lease, or built by another replica),
loads and warms it up and starts its batcher (``loading.EngineLoader``). With
progressive engines a version first serves on its baseline engine (state
``baseline``) while its optimized engine is obtained, then that engine is swapped
in (``ready``); if it fails, the version stays on the baseline (``fallback``,
with the failure in ``error``). An engine that serves but is not what was asked
(a transform that left every op in FP32) is ``fallback`` too.

Every state change goes through ``EngineManager.transition``, checked against
the table in ``states.py``, and wakes whoever follows the catalog
(``reconcile.Reconciler``), which reports the change. A failure local to this
process (a load out of memory, say) is retried after a backoff (``retry``); a
build failed for good in the catalog (``final``) is not, until ``kiln catalog retry``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from engines.backends.base import Backend
from engines.errors import EngineError, StoreCorrupted
from engines.store import EngineStore
from engines.types import BuildOptions, engine_cache_key
from service.batching import BatchingConfig
from service.catalog.base import CatalogState, NewVersion, VersionCatalog, VersionRecord
from service.errors import TooManyEngines
from service.lifecycle.builds import EngineSource, backoff_s
from service.lifecycle.jobs import BuildFailure, BuildRunner
from service.lifecycle.loading import EngineLoader, log_baseline, log_ready, log_swap
from service.lifecycle.registry import EngineVersion, Registry
from service.lifecycle.serving import Tier
from service.lifecycle.states import SERVABLE, SETTLED, WORKING, VersionState
from service.metrics import KilnMetrics
from service.settings import Settings

log = logging.getLogger("kiln.engines")

# States in which an obtained engine goes on to load (others: deleted meanwhile).
BUILT = (VersionState.BUILDING, VersionState.BASELINE)

PHASE_ON_ENTRY: dict[VersionState, str | None] = {
    VersionState.LOADING: "load",
    VersionState.READY: None,
    VersionState.FALLBACK: None,
    VersionState.UNLOADING: "unload",
}
"""The phase a version shows on entering a state (others keep theirs: a failed
version shows the phase it failed in)."""


class EngineManager:
    def __init__(
        self,
        settings: Settings,
        store: EngineStore,
        registry: Registry,
        backend: Backend,
        metrics: KilnMetrics,
        builds: BuildRunner,
        catalog: VersionCatalog,
        *,
        baselines: bool = True,
    ) -> None:
        """``baselines=False``: never serve a baseline engine (a process that only
        builds), whatever the versions' ``progressive``."""
        self.settings = settings
        self.store = store
        self.registry = registry
        self.backend = backend
        self.metrics = metrics
        self.builds = builds
        self.catalog = catalog
        self.baselines = baselines
        self.device = backend.device_signature()
        self.loader = EngineLoader(settings, store, backend, metrics)
        self.source = EngineSource(settings, catalog, builds, store, backend.name, metrics)
        self.changed: Callable[[], None] = lambda: None  # set by the reconciler: report and prune
        self._tasks: set[asyncio.Task[None]] = set()
        self._unloads: dict[EngineVersion, asyncio.Task[None]] = {}
        self._restoring: set[EngineVersion] = set()
        self.restored = False
        self._shutting_down = False

    def cache_key(self, model_sha256: str, options: BuildOptions) -> str:
        return engine_cache_key(model_sha256, options, self.device)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a lifecycle task failed", exc_info=task.exception())

    # -- the state machine -----------------------------------------------------------

    def transition(
        self,
        version: EngineVersion,
        state: VersionState,
        *,
        error: dict[str, Any] | None = None,
        phase: str | None = None,
    ) -> None:
        """The one place a version's state changes (``IllegalTransition`` for a move
        the table does not allow)."""
        version.move_to(state)
        version.error = error
        if phase is not None or state in PHASE_ON_ENTRY:
            version.phase = phase if phase is not None else PHASE_ON_ENTRY[state]
        if state in (VersionState.READY, VersionState.FALLBACK):
            version.progress = 1.0
        if state in SETTLED or state in SERVABLE or state == VersionState.UNLOADING:
            self._restoring.discard(version)
        if version.serving is not None and state in SERVABLE:
            serving = version.serving
            self.metrics.set_serving(
                version.name, version.version, serving.tier, serving.backend, serving.precision
            )
            self.metrics.fallback.labels(version.name, str(version.version)).set(
                1 if state == VersionState.FALLBACK else 0
            )
        self._refresh_gauges()
        self.changed()

    def _refresh_gauges(self) -> None:
        for state, count in self.registry.count_by_state().items():
            self.metrics.engines.labels(state).set(count)

    def pending_restores(self) -> list[EngineVersion]:
        """Versions restored at start-up that have not yet loaded or failed."""
        return sorted(self._restoring, key=lambda v: (v.name, v.version))

    # -- versions from the catalog ------------------------------------------------------

    def check_limits(self, name: str) -> None:
        names = self.registry.names()
        if name not in names and len(names) >= self.settings.max_engines:
            raise TooManyEngines(
                f"the server holds {len(names)} engines, its limit (KILN_MAX_ENGINES); delete one first"
            )

    async def register(
        self,
        name: str,
        model_sha256: str,
        model_filename: str,
        options: BuildOptions,
        batching: BatchingConfig,
        *,
        progressive: bool = False,
    ) -> EngineVersion:
        """The next version of ``name``: numbered by the catalog, and held here first
        (building in the background); other replicas follow it."""
        self.check_limits(name)
        record = await self.catalog.create_version(
            NewVersion(name, model_sha256, model_filename, options.to_dict(), batching.to_dict(), progressive)
        )
        version = self.follow(record)
        self.changed()
        return version

    def follow(self, record: VersionRecord, *, restoring: bool = False) -> EngineVersion:
        """Hold a catalog version here (once): a failed one as failed, others obtain
        and load their engine in the background. ``restoring``: readiness waits for it."""
        held = self.registry.find(record.name, record.version)
        if held is not None:
            return held
        options = BuildOptions.from_dict(record.options)
        failed = record.state == CatalogState.FAILED
        version = EngineVersion(
            name=record.name,
            version=record.version,
            model_sha256=record.model_sha256,
            model_filename=record.model_filename,
            options=options,
            batching=BatchingConfig.from_dict(record.batching),
            cache_key=self.cache_key(record.model_sha256, options),
            created_at=record.created_at,
            progressive=record.progressive,
            retries=record.retries,
            _state=VersionState.FAILED if failed else VersionState.BUILDING,
            error=record.error if failed else None,
            phase=None if failed else ("restore" if restoring else "queued"),
            final=failed,
        )
        self.registry.index(version)
        self._refresh_gauges()
        if not failed:
            if restoring:
                self._restoring.add(version)
            self._spawn(self._run(version))
        return version

    def retry(self, version: EngineVersion) -> bool:
        """Start a version again: a failed one from the start, one serving on its
        baseline after its optimized engine failed from that engine. False when there
        is nothing to retry (it serves its optimized engine, or is working)."""
        if version.state == VersionState.FAILED:
            self.transition(version, VersionState.BUILDING, phase="retry")
        elif (
            version.state == VersionState.FALLBACK
            and version.serving is not None
            and version.serving.tier == Tier.BASELINE
        ):
            self.transition(version, VersionState.BASELINE, phase="retry")
        else:
            return False
        version.retry_at, version.final, version.progress = None, False, 0.0
        self._spawn(self._run(version))
        return True

    # -- obtain and load -------------------------------------------------------------

    async def _run(self, version: EngineVersion) -> None:
        started = time.monotonic()
        try:
            meta = await self.source.committed(version)
            if meta is not None:
                self.metrics.builds.labels("cached").inc()
            elif version.progressive and self.baselines and version.batcher is None:
                await self._serve_baseline(version)
                if version.state not in BUILT:
                    return  # deleted while the baseline loaded
            if meta is None:
                meta = await self.source.obtain(version)
            if version.state not in BUILT:
                return  # deleted meanwhile
            try:
                await self._load(version, meta)
            except StoreCorrupted as exc:
                # The artifact passed its checksum but the backend cannot load it
                # (for example a plan recorded for another device): rebuild it once.
                if version.state not in (VersionState.LOADING, VersionState.BASELINE):
                    return
                log.warning("%s; rebuilding it from the stored model", exc.message)
                if version.state == VersionState.LOADING:
                    self.transition(version, VersionState.BUILDING, phase="rebuild")
                else:
                    version.phase = "rebuild"
                await self.source.invalidate(version, meta)
                meta = await self.source.obtain(version)
                if version.state not in BUILT:
                    return
                await self._load(version, meta)
        except BuildFailure as failure:
            if version.state not in WORKING or self._shutting_down:
                return  # deleted, or a shutdown: not the version's fault
            self.metrics.build_duration.observe(time.monotonic() - started)
            log.warning("build of %s v%d failed: %s", version.name, version.version, failure.message)
            self._fail(version, failure.to_dict(), final=failure.final)
        except EngineError as exc:
            if version.state not in WORKING or self._shutting_down:
                return
            log.warning("loading %s v%d failed: %s", version.name, version.version, exc.message)
            self._fail(version, {"type": exc.kind, "message": exc.message}, final=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._shutting_down:
                return
            log.exception("unexpected error while loading %s v%d", version.name, version.version)
            if version.state in WORKING:
                self._fail(
                    version, {"type": "internal", "message": f"{type(exc).__name__}: {exc}"}, final=False
                )

    def _fail(self, version: EngineVersion, error: dict[str, Any], *, final: bool) -> None:
        """The optimized engine failed: a version on its baseline keeps serving there
        (fallback, with the error); any other fails. A failure that is not ``final`` is
        retried here after a backoff, up to ``KILN_BUILD_RETRIES`` times."""
        version.final = final
        if not final:
            version.attempts += 1
            if version.attempts <= self.settings.build_retries:
                delay = backoff_s(self.settings.build_retry_backoff_s, version.attempts)
                version.retry_at = time.monotonic() + delay
        if version.state == VersionState.BASELINE:
            log.warning("%s v%d keeps serving on its baseline engine", version.name, version.version)
            self.transition(version, VersionState.FALLBACK, error=error)
        else:
            self.transition(version, VersionState.FAILED, error=error)

    async def _load(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        version.meta = meta
        if version.state == VersionState.BUILDING:
            self.transition(version, VersionState.LOADING)
        else:
            version.phase = "load"  # beside the baseline, which goes on serving
        runner = await self.loader.open(version, meta)
        if version.state not in (VersionState.LOADING, VersionState.BASELINE):  # deleted meanwhile
            await asyncio.to_thread(runner.close)
            return
        if version.batcher is None:
            try:
                self.loader.serve(version, runner, meta)
            except BaseException:
                await asyncio.to_thread(runner.close)
                raise
            self._served(version, meta)
            return
        before = version.serving
        previous = await self.loader.swap(version, runner, meta)
        if version.state != VersionState.BASELINE:  # deleted during the swap: the delete closed it
            await asyncio.to_thread(runner.close)
            return
        log_swap(version, before)
        self._served(version, meta)
        if previous is not None:
            await asyncio.to_thread(previous.close)

    def _served(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        """The built engine serves: ``ready`` when it is what was asked, ``fallback``
        (with the build's reason) when it is not (a transform that left every op in FP32)."""
        version.attempts, version.retry_at = 0, None
        fallback = meta.get("report", {}).get("fallback")
        if fallback:
            log.warning("%s v%d serves, not as requested: %s", version.name, version.version, fallback)
            self.transition(version, VersionState.FALLBACK, error={"type": "fallback", "message": fallback})
        else:
            self.transition(version, VersionState.READY)
            log_ready(version, meta)

    async def _serve_baseline(self, version: EngineVersion) -> None:
        """Serve on the upload itself while the optimized engine is obtained
        (``building`` → ``baseline``); a baseline that cannot load is logged and skipped."""
        version.phase = "baseline"
        started = time.monotonic()
        runner = await self.loader.open_baseline(version)
        if runner is None:
            version.phase = "queued"
            return
        if version.state != VersionState.BUILDING:  # deleted meanwhile
            await asyncio.to_thread(runner.close)
            return
        try:
            self.loader.serve_baseline(version, runner)
        except BaseException:
            await asyncio.to_thread(runner.close)
            raise
        self.transition(version, VersionState.BASELINE, phase="queued")
        log_baseline(version, started)

    # -- delete, shutdown -------------------------------------------------------------

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no build, load or unload is running (for tests and start-up)."""
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._tasks

    def unload(self, version: EngineVersion) -> asyncio.Task[None]:
        """Start removing one version here (at once unservable); returns the task that
        finishes it. Its build stops unless an identical version still waits for it.
        Files stay: garbage collection removes them once nothing references them."""
        task = self._unloads.get(version)
        if task is not None:
            return task
        self.source.release(version)
        self.transition(version, VersionState.UNLOADING)
        task = self._spawn(self._teardown(version))
        self._unloads[version] = task
        return task

    async def delete(self, version: EngineVersion) -> None:
        await asyncio.shield(self.unload(version))

    async def _teardown(self, version: EngineVersion) -> None:
        try:
            await self.loader.close(version)
            self.registry.remove(version)
            self._refresh_gauges()
            self.changed()
        finally:
            self._unloads.pop(version, None)

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Drain every batcher (queued requests finish), stop builds, close runners.
        The catalog keeps what exists: the next start follows it again."""
        self._shutting_down = True
        versions = [v for v in self.registry.all_versions() if v.batcher is not None]
        await asyncio.gather(*(v.batcher.stop(drain_timeout_s) for v in versions if v.batcher))
        await self.builds.shutdown()
        await self.source.shutdown()
        for task in list(self._tasks):
            task.cancel()
        for version in versions:
            if version.runner is not None:
                version.runner.close()
            version.runner = None
            version.batcher = None
