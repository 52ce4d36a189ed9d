"""Engine lifecycle: register → build (child process) → load → warm up → serve → unload.

With progressive engines, a version whose optimized engine is not in the store
first serves on its baseline engine (state ``baseline``); the optimized engine
then builds, loads and warms up beside it and is swapped into the version's
batcher (``ready``). If the optimized engine fails, the version stays on the
baseline (``fallback``, with the failure in ``error``).

Every state change of a version goes through ``EngineManager.transition``, checked
against the table in ``states.py``. The manager owns the background tasks of
builds, loads and unloads (kept in a set so they are not garbage-collected), and
the rules that connect the store, the registry, the build runner and the batchers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engines.backends.base import Backend, Runner
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.baseline import load_baseline
from engines.build import BuildJob, overall_progress, warm_up, warm_up_engine
from engines.errors import EngineError, StoreCorrupted
from engines.onnx_model import load_model, read_signature
from engines.shapes import resolve_shapes
from engines.store import EngineStore
from engines.types import BuildOptions, Signature, engine_cache_key
from service import tracing
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import NotFound, TooManyEngines
from service.lifecycle.jobs import BuildFailure, BuildRunner
from service.lifecycle.registry import EngineVersion, Registry
from service.lifecycle.serving import Serving
from service.lifecycle.states import RECORDED, RESTORED_AS, SERVABLE, SETTLED, WORKING, VersionState
from service.metrics import KilnMetrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.catalog.base import VersionRecord
    from service.catalog.replica import ClusterReplica

log = logging.getLogger("kiln.engines")

# States in which a finished optimized build goes on to load (others: deleted meanwhile).
BUILT = (VersionState.BUILDING, VersionState.BASELINE)

PHASE_ON_ENTRY: dict[VersionState, str | None] = {
    VersionState.LOADING: "load",
    VersionState.READY: None,
    VersionState.FALLBACK: None,
    VersionState.UNLOADING: "unload",
}
"""The phase a version shows on entering a state (others keep theirs: a failed
version shows the phase it failed in)."""


@dataclass(eq=False)
class SharedBuild:
    """One running build of a cache key, and the versions waiting for it."""

    job_id: str
    future: asyncio.Future[dict[str, Any]]
    waiters: set[EngineVersion] = field(default_factory=set)


class EngineManager:
    def __init__(
        self,
        settings: Settings,
        store: EngineStore,
        registry: Registry,
        backend: Backend,
        metrics: KilnMetrics,
        builds: BuildRunner,
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
        self.baselines = baselines
        self.device = backend.device_signature()
        self._tasks: set[asyncio.Task[None]] = set()
        self._builds: dict[str, SharedBuild] = {}
        self._build_numbers = itertools.count(1)
        self._unloads: dict[EngineVersion, asyncio.Task[None]] = {}
        self._restoring: set[EngineVersion] = set()
        self.restored = False
        self._shutting_down = False
        # Cluster mode: the catalog numbers versions and decides builds and pruning.
        self.cluster: ClusterReplica | None = None

    # -- helpers -----------------------------------------------------------------

    def cache_key(self, model_sha256: str, options: BuildOptions) -> str:
        return engine_cache_key(model_sha256, options, self.device)

    def backend_kwargs(self) -> dict[str, Any]:
        return dict(self.settings.backend_options().get(self.backend.name, {}))

    @staticmethod
    def batch_sizes(options: BuildOptions, batching: BatchingConfig) -> tuple[int, ...]:
        sizes = {1, options.max_batch_size, *batching.preferred_batch_sizes}
        return tuple(sorted(size for size in sizes if 1 <= size <= options.max_batch_size))

    def build_job(
        self, version: EngineVersion, *, temp_owner: str | None = None, write_commit_point: bool = True
    ) -> BuildJob:
        """The build of ``version``'s engine (in a cluster: in the replica's own temp
        directory, committed through the catalog rather than meta.json)."""
        return BuildJob(
            store_root=str(self.store.root),
            model_sha256=version.model_sha256,
            options=version.options.to_dict(),
            backend=self.backend.name,
            cache_key=version.cache_key,
            batch_sizes=self.batch_sizes(version.options, version.batching),
            backend_kwargs=self.backend_kwargs(),
            temp_owner=temp_owner,
            write_commit_point=write_commit_point,
        )

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        the table does not allow). Settled and servable versions are persisted;
        settled ones may let older versions of the engine be pruned."""
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
        if state in RECORDED:
            self.registry.save(version)
        self._refresh_gauges()
        if self.cluster is not None:
            self.cluster.wake.set()  # report the new state to the catalog, which prunes
        elif state in SETTLED and not self._shutting_down:
            self.prune(version.name)

    def _refresh_gauges(self) -> None:
        for state, count in self.registry.count_by_state().items():
            self.metrics.engines.labels(state).set(count)

    def pending_restores(self) -> list[EngineVersion]:
        """Versions restored at start-up that have not yet loaded or failed."""
        return sorted(self._restoring, key=lambda v: (v.name, v.version))

    # -- uploads -----------------------------------------------------------------

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
        """The next version of ``name``, building in the background: numbered here on a
        single node; in a cluster numbered (and pruned) by the catalog, and adopted by
        every replica, this one first."""
        if self.cluster is None:
            return self.create(name, model_sha256, model_filename, options, batching, progressive=progressive)
        self.check_limits(name)
        allocation = await self.cluster.register(
            name, model_sha256, model_filename, options.to_dict(), batching.to_dict(), progressive
        )
        return self.adopt(allocation.version)

    def adopt(self, record: VersionRecord, *, restoring: bool = False) -> EngineVersion:
        """Cluster mode: hold a version the catalog has (once) and load it in the
        background. ``restoring``: readiness waits for it, as for a restored version."""
        try:
            return self.registry.get(record.name, record.version)
        except NotFound:
            pass
        options = BuildOptions.from_dict(record.options)
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
        )
        self.registry.index(version)
        if restoring:
            self._restoring.add(version)
        self._refresh_gauges()
        self._spawn(self._build_and_load(version))
        return version

    def create(
        self,
        name: str,
        model_sha256: str,
        model_filename: str,
        options: BuildOptions,
        batching: BatchingConfig,
        *,
        progressive: bool = False,
    ) -> EngineVersion:
        """Register the next version of ``name`` and start its build in the background
        (``progressive``: serving on the baseline engine meanwhile)."""
        self.check_limits(name)
        version = EngineVersion(
            name=name,
            version=self.registry.next_version(name),
            model_sha256=model_sha256,
            model_filename=model_filename,
            options=options,
            batching=batching,
            cache_key=self.cache_key(model_sha256, options),
            progressive=progressive,
        )
        self.registry.add(version)
        self._refresh_gauges()
        self._spawn(self._build_and_load(version))
        self.prune(name)
        return version

    def prune(self, name: str) -> None:
        """Keep the newest ``max_versions_per_engine`` versions by number, and the newest
        servable one; older versions are unloaded once they settle (ready or failed).

        Decided by version number alone, so identical uploads end with the same
        versions whatever order their builds finish in."""
        try:
            versions = self.registry.versions(name)
        except NotFound:
            return  # deleted meanwhile
        live = [v for v in versions if v.state != VersionState.UNLOADING]
        keep = {v.version for v in live[-self.settings.max_versions_per_engine :]}
        newest_servable = next((v for v in reversed(live) if v.servable), None)
        if newest_servable is not None:
            keep.add(newest_servable.version)
        for version in live:
            if version.version not in keep and version.state in SETTLED:
                self.unload(version)

    # -- build and load ------------------------------------------------------------

    def progress_handler(self, version: EngineVersion, spans: tracing.BuildSpans | None = None) -> Any:
        def on_progress(phase: str, fraction: float) -> None:
            if spans is not None:
                spans.phase(phase)
            if version.state not in WORKING:
                return
            version.phase = phase
            version.progress = max(version.progress, overall_progress(phase, fraction, version.progress))

        return on_progress

    async def _obtain_engine(self, version: EngineVersion) -> dict[str, Any] | None:
        """The committed engine's metadata: the store's (a single node) or the catalog's
        (a cluster) when there is one; else serving on the baseline if progressive, and
        the engine built here (or, in a cluster, by whichever replica holds its lease).
        None when the version was deleted meanwhile."""
        started = time.monotonic()
        if self.cluster is not None:
            committed = await self.cluster.is_committed(version)
        else:
            meta = self._committed_meta(version.cache_key)
            if meta is not None:
                self.metrics.builds.labels("cached").inc()
                return meta
            committed = False
        if not committed and version.progressive and self.baselines:
            await self._serve_baseline(version)
            if version.state not in BUILT:
                return None  # deleted while the baseline loaded
        if self.cluster is not None:
            return await self.cluster.obtain_engine(version)
        meta = await self._build_once(version)
        self.metrics.builds.labels("succeeded").inc()
        self.metrics.build_duration.observe(time.monotonic() - started)
        return meta

    async def _rebuild(self, version: EngineVersion, meta: dict[str, Any]) -> dict[str, Any]:
        """After a committed engine did not load: forget it, and build it again."""
        if self.cluster is not None:
            await self.cluster.catalog.invalidate_build(version.cache_key, meta["artifact_sha256"])
            return await self.cluster.obtain_engine(version)
        self.store.discard_engine(version.cache_key)
        meta = await self._build_once(version)
        self.metrics.builds.labels("succeeded").inc()
        return meta

    async def _build_and_load(self, version: EngineVersion) -> None:
        started = time.monotonic()
        try:
            meta = await self._obtain_engine(version)
            if meta is None or version.state not in BUILT:
                return  # deleted while building
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
                meta = await self._rebuild(version, meta)
                if version.state not in BUILT:
                    return
                await self._load(version, meta)
        except BuildFailure as failure:
            if version.state not in WORKING or self._shutting_down:
                return  # deleted, or a shutdown: not the version's fault, its record stays as it was
            self.metrics.builds.labels("failed").inc()
            self.metrics.build_duration.observe(time.monotonic() - started)
            log.warning("build of %s v%d failed: %s", version.name, version.version, failure.message)
            self._fail(version, failure.to_dict())
        except EngineError as exc:
            if version.state not in WORKING:
                return
            log.warning("loading %s v%d failed: %s", version.name, version.version, exc.message)
            self._fail(version, {"type": exc.kind, "message": exc.message})
        except Exception as exc:
            log.exception("unexpected error while building %s v%d", version.name, version.version)
            if version.state in WORKING:
                self._fail(version, {"type": "internal", "message": f"{type(exc).__name__}: {exc}"})

    def _fail(self, version: EngineVersion, error: dict[str, Any]) -> None:
        """The optimized engine failed: a version on its baseline keeps serving there
        (fallback, with the error); any other fails."""
        if version.state == VersionState.BASELINE:
            log.warning("%s v%d keeps serving on its baseline engine", version.name, version.version)
            self.transition(version, VersionState.FALLBACK, error=error)
        else:
            self.transition(version, VersionState.FAILED, error=error)

    def _settle_served(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        """The built engine serves: ``ready`` when it is what was asked, ``fallback`` (with
        the build's reason) when it is not (a transform that left every op in FP32)."""
        fallback = meta.get("report", {}).get("fallback")
        if fallback:
            log.warning("%s v%d serves, not as requested: %s", version.name, version.version, fallback)
            self.transition(version, VersionState.FALLBACK, error={"type": "fallback", "message": fallback})
        else:
            self.transition(version, VersionState.READY)
            _log_ready(version, meta)

    def _committed_meta(self, cache_key: str) -> dict[str, Any] | None:
        """The stored engine for this key if its checksum holds; a corrupt one is
        discarded so that it is rebuilt from the stored ONNX."""
        try:
            return self.store.verify_engine(cache_key)
        except StoreCorrupted as exc:
            log.warning("%s; rebuilding it from the stored model", exc.message)
            self.store.discard_engine(cache_key)
            return None

    async def _build_once(self, version: EngineVersion) -> dict[str, Any]:
        """Build the engine for ``version.cache_key``; identical uploads that arrive
        while a build runs share it instead of building twice. The build is cancelled
        only when every version waiting for it is deleted."""
        running = self._builds.get(version.cache_key)
        if running is not None:
            running.waiters.add(version)
            version.phase = "waiting for an identical build"
            try:
                return await asyncio.shield(running.future)
            finally:
                running.waiters.discard(version)
        build = SharedBuild(
            # Unique per build: cancelling one never touches a later build of the same version.
            job_id=f"{version.name}-v{version.version}-build{next(self._build_numbers)}",
            future=asyncio.get_running_loop().create_future(),
            waiters={version},
        )
        self._builds[version.cache_key] = build
        job = self.build_job(version)
        spans = tracing.build_spans(
            {
                "kiln.engine": version.name,
                "kiln.version": version.version,
                "kiln.cache_key": version.cache_key,
            }
        )
        on_progress = self.progress_handler(version, spans)
        try:
            meta = await self.builds.run(job, on_progress, job_id=build.job_id)
            build.future.set_result(meta)
            if spans is not None:
                spans.end()
            return meta
        except BaseException as exc:
            if spans is not None:
                spans.end(error=f"{type(exc).__name__}: {exc}")
            build.future.set_exception(exc)
            build.future.exception()  # mark retrieved when nobody else waits
            raise
        finally:
            build.waiters.discard(version)
            if self._builds.get(version.cache_key) is build:
                del self._builds[version.cache_key]

    async def _load(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        version.meta = meta
        if version.state == VersionState.BUILDING:
            self.transition(version, VersionState.LOADING)
        else:
            version.phase = "load"  # beside the baseline, which goes on serving
        signature = Signature.from_dict(meta["signature"])
        artifact = self.store.artifact_path(version.cache_key, meta)
        instances = version.batching.instances
        runner = await asyncio.to_thread(
            self.backend.load, artifact, signature, version.options, instances=instances
        )
        try:
            max_batch = int(meta["max_batch_size"])
            if self.settings.warmup:
                await asyncio.to_thread(warm_up_engine, runner, meta, {1, max_batch})
        except Exception:
            runner.close()
            raise
        if version.state not in (VersionState.LOADING, VersionState.BASELINE):  # deleted meanwhile
            runner.close()
            return
        if version.batcher is not None:
            await self._swap(version, runner, meta)
            return
        batching = version.batching
        if batching.max_batch_size != max_batch:
            batching = replace(
                batching,
                max_batch_size=max_batch,
                preferred_batch_sizes=tuple(
                    size for size in batching.preferred_batch_sizes if size <= max_batch
                ),
            )
        version.batcher = self._start_batcher(version, runner, signature, batching, _latency_profile(meta))
        version.runner = runner
        version.serving = Serving.optimized(meta, runner)
        self._settle_served(version, meta)

    async def _serve_baseline(self, version: EngineVersion) -> None:
        """Load the upload itself as the baseline engine, warm it up and serve on it
        (``building`` → ``baseline``). A baseline that cannot load or run is logged
        and skipped: the optimized build, which goes on, decides the version's fate."""
        version.phase = "baseline"
        started = time.monotonic()
        model_path = self.store.model_path(version.model_sha256)
        external_data = self.store.is_package(version.model_sha256)
        runner: Runner | None = None
        try:
            signature = await asyncio.to_thread(
                lambda: read_signature(load_model(model_path, external_data=external_data))
            )
            backend = self.backend if isinstance(self.backend, OnnxRuntimeBackend) else None
            runner = await asyncio.to_thread(
                load_baseline,
                model_path,
                signature,
                version.options,
                backend=backend,
                instances=version.batching.instances,
            )
            if self.settings.warmup:
                resolved = resolve_shapes(signature, version.options.shapes)
                await asyncio.to_thread(warm_up, runner, signature, {1, runner.max_batch_size}, resolved)
        except Exception as exc:
            if runner is not None:
                runner.close()
            reason = exc.message if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "%s v%d has no baseline engine (%s); it serves once its optimized engine is ready",
                version.name,
                version.version,
                reason,
            )
            version.phase = "queued"
            return
        if version.state != VersionState.BUILDING:  # deleted meanwhile
            runner.close()
            return
        version.batcher = self._start_batcher(version, runner, signature, version.batching, {})
        version.runner = runner
        version.serving = Serving.baseline(runner.provider)
        self.transition(version, VersionState.BASELINE, phase="queued")
        log.info(
            "engine %s v%d serves on its baseline engine (%s on %s, %s) after %.2f s; its optimized "
            "engine builds",
            version.name,
            version.version,
            version.serving.backend,
            version.serving.provider,
            version.serving.precision,
            time.monotonic() - started,
        )

    async def _swap(self, version: EngineVersion, runner: Runner, meta: dict[str, Any]) -> None:
        """Swap the warmed-up optimized engine into the version's batcher: new batches
        run on it, running ones finish on the baseline, which is then closed."""
        assert version.batcher is not None
        previous, before = version.runner, version.serving
        await version.batcher.swap(runner.infer_prechecked, latency_profile_ms=_latency_profile(meta))
        if version.state != VersionState.BASELINE:  # deleted during the swap: the delete closed the baseline
            await asyncio.to_thread(runner.close)
            return
        version.runner = runner
        version.serving = Serving.optimized(meta, runner)
        self._settle_served(version, meta)
        log.info(
            "engine %s v%d swapped from its %s engine (%s, %s) to its optimized engine (%s, %s)",
            version.name,
            version.version,
            before.tier if before else "previous",
            before.backend if before else "?",
            before.precision if before else "?",
            version.serving.backend,
            version.serving.precision,
        )
        if previous is not None:
            await asyncio.to_thread(previous.close)

    def _start_batcher(
        self,
        version: EngineVersion,
        runner: Runner,
        signature: Signature,
        batching: BatchingConfig,
        latency_ms: dict[int, float],
    ) -> DynamicBatcher:
        batcher = DynamicBatcher(
            # Every protocol checks each request's feeds before queueing it.
            runner.infer_prechecked,
            batching,
            batchable=signature.batchable,
            observer=self.metrics.engine_observer(version.name, version.version),
            name=f"{version.name}-v{version.version}",
            latency_profile_ms=latency_ms,
            policy=self.settings.queue_policy(),
        )
        batcher.start()
        return batcher

    # -- restore, delete, shutdown -----------------------------------------------

    async def restore(self) -> None:
        """Bring back the versions recorded in the store, each in the state
        ``RESTORED_AS`` gives: ready ones are loaded (or rebuilt from the stored ONNX
        when the device or backend changed, or the artifact is corrupt); builds a
        restart interrupted are failed."""
        removed = self.store.cleanup_tmp()
        if removed:
            log.info("removed %d leftover temporary files from the store", removed)
        records, problems = self.registry.records.load_records()
        for problem in problems:
            log.warning("unreadable record in the store: %s", problem)
        for record in records:
            try:
                recorded = VersionState(record["state"])
                state = RESTORED_AS[recorded]
                if state is None:  # a delete the restart interrupted
                    self.registry.records.delete_record(record["name"], int(record["version"]))
                    continue
                version = EngineVersion.from_record(record, state)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping a malformed record %s: %s", record.get("name"), exc)
                continue
            self.registry.index(version)
            if "progressive" not in record:  # recorded before progressive engines
                version.progressive = self.settings.progressive
            if recorded in WORKING and state == VersionState.FAILED:
                version.error = {
                    "type": "interrupted",
                    "message": "the server stopped while this version was being built; upload it again",
                }
                version.phase = None
                self.registry.save(version)
            elif state == VersionState.BUILDING:
                version.cache_key = self.cache_key(version.model_sha256, version.options)
                version.phase = "restore"
                self._restoring.add(version)
                self._spawn(self._build_and_load(version))
        self.restored = True
        self._refresh_gauges()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no build, load or unload is running (for tests and start-up)."""
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._tasks

    def unload(self, version: EngineVersion) -> asyncio.Task[None]:
        """Start removing one version (at once unservable); returns the task that
        finishes it. Its build is cancelled unless an identical upload still waits for it."""
        task = self._unloads.get(version)
        if task is not None:
            return task
        build = self._builds.get(version.cache_key)
        if build is not None and version in build.waiters:
            build.waiters.discard(version)
            if not build.waiters:
                self.builds.cancel(build.job_id)
                # A new upload of the same model starts its own build, not this dying one.
                del self._builds[version.cache_key]
        self.transition(version, VersionState.UNLOADING)
        task = self._spawn(self._teardown(version))
        self._unloads[version] = task
        return task

    async def delete(self, version: EngineVersion) -> None:
        """Unload and remove one version; its engine files go when nothing uses them."""
        await asyncio.shield(self.unload(version))

    async def _teardown(self, version: EngineVersion) -> None:
        try:
            batcher, runner = version.batcher, version.runner
            version.batcher = version.runner = None
            if batcher is not None:
                await batcher.stop(drain_timeout_s=min(self.settings.drain_timeout_s, 5.0))
            if runner is not None:
                await asyncio.to_thread(runner.close)
            self.metrics.forget_engine(version.name, version.version)
            self.registry.remove(version)
            if self.cluster is None:  # in a cluster, collected under the catalog's gc lease
                self._collect_garbage(version)
            self._refresh_gauges()
        finally:
            self._unloads.pop(version, None)

    def _collect_garbage(self, version: EngineVersion) -> None:
        records = self.registry.all_versions()
        if version.cache_key not in {v.cache_key for v in records} and version.cache_key not in self._builds:
            self.store.discard_engine(version.cache_key)
        if version.model_sha256 not in {v.model_sha256 for v in records}:
            self.store.remove_model(version.model_sha256)

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Drain every batcher (queued requests finish), stop builds, close runners.
        Records stay as they are: the next start restores from them."""
        self._shutting_down = True
        versions = [v for v in self.registry.all_versions() if v.batcher is not None]
        await asyncio.gather(*(v.batcher.stop(drain_timeout_s) for v in versions if v.batcher))
        await self.builds.shutdown()
        for task in list(self._tasks):
            task.cancel()
        for version in versions:
            if version.runner is not None:
                version.runner.close()
            version.runner = None
            version.batcher = None


def _log_ready(version: EngineVersion, meta: dict[str, Any]) -> None:
    log.info(
        "engine %s v%d is ready (%s, %s)",
        version.name,
        version.version,
        meta.get("backend"),
        meta.get("precision"),
    )


def _latency_profile(meta: dict[str, Any]) -> dict[int, float]:
    """The build report's latency per batch size (ms), for the adaptive batcher."""
    return {int(size): float(ms) for size, ms in (meta.get("report", {}).get("latency_ms") or {}).items()}
