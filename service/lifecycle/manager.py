"""Engine lifecycle: upload → build (child process) → load → warm up → serve → unload.

The manager owns the background tasks of builds and loads (kept in a set so they
are not garbage-collected), and the rules that connect the store, the registry,
the build runner and the batchers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from engines.backends.base import Backend
from engines.build import BuildJob, overall_progress, warm_up
from engines.errors import EngineError, StoreCorrupted
from engines.store import EngineStore
from engines.types import BuildOptions, Signature, engine_cache_key
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import NotFound, TooManyEngines
from service.lifecycle.jobs import BuildFailure, BuildRunner
from service.lifecycle.registry import EngineVersion, Registry, State
from service.metrics import KilnMetrics
from service.settings import Settings

log = logging.getLogger("kiln.engines")


class EngineManager:
    def __init__(
        self,
        settings: Settings,
        store: EngineStore,
        registry: Registry,
        backend: Backend,
        metrics: KilnMetrics,
        builds: BuildRunner,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.backend = backend
        self.metrics = metrics
        self.builds = builds
        self.device = backend.device_signature()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._shutting_down = False

    # -- helpers -----------------------------------------------------------------

    def cache_key(self, model_sha256: str, options: BuildOptions) -> str:
        return engine_cache_key(model_sha256, options, self.device)

    def backend_kwargs(self) -> dict[str, Any]:
        return dict(self.settings.backend_options().get(self.backend.name, {}))

    @staticmethod
    def batch_sizes(options: BuildOptions, batching: BatchingConfig) -> tuple[int, ...]:
        sizes = {1, options.max_batch_size, *batching.preferred_batch_sizes}
        return tuple(sorted(size for size in sizes if 1 <= size <= options.max_batch_size))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(
        self, version: EngineVersion, state: State, *, error: dict[str, Any] | None = None
    ) -> None:
        version.state = state
        version.error = error
        if state in (State.READY, State.FAILED):
            version.phase = None if state == State.READY else version.phase
        if state == State.READY:
            version.progress = 1.0
        self.registry.save(version)
        self._refresh_gauges()
        if state in (State.READY, State.FAILED) and not self._shutting_down:
            # Versions created while others were building could not be pruned then.
            self._spawn(self._prune_versions(version.name))

    def _refresh_gauges(self) -> None:
        for state, count in self.registry.count_by_state().items():
            if state != "unloading":
                self.metrics.engines.labels(state).set(count)

    # -- uploads -----------------------------------------------------------------

    def check_limits(self, name: str) -> None:
        names = self.registry.names()
        if name not in names and len(names) >= self.settings.max_engines:
            raise TooManyEngines(
                f"the server holds {len(names)} engines, its limit (KILN_MAX_ENGINES); delete one first"
            )

    def create(
        self,
        name: str,
        model_sha256: str,
        model_filename: str,
        options: BuildOptions,
        batching: BatchingConfig,
    ) -> EngineVersion:
        """Register the next version of ``name`` and start its build in the background."""
        self.check_limits(name)
        version = EngineVersion(
            name=name,
            version=self.registry.next_version(name),
            model_sha256=model_sha256,
            model_filename=model_filename,
            options=options,
            batching=batching,
            cache_key=self.cache_key(model_sha256, options),
        )
        self.registry.add(version)
        self._refresh_gauges()
        self._spawn(self._build_and_load(version))
        self._spawn(self._prune_versions(name))
        return version

    async def _prune_versions(self, name: str) -> None:
        """Keep at most ``max_versions_per_engine`` versions: drop the oldest that are
        not building (and never the newest ready one)."""
        try:
            versions = self.registry.versions(name)
        except NotFound:
            return  # deleted meanwhile
        excess = len(versions) - self.settings.max_versions_per_engine
        if excess <= 0:
            return
        newest_ready = next((v for v in reversed(versions) if v.state == State.READY), None)
        for version in versions:
            if excess <= 0:
                break
            if version.state in (State.BUILDING, State.LOADING) or version is newest_ready:
                continue
            await self.delete(version)
            excess -= 1

    # -- build and load ------------------------------------------------------------

    def _progress_handler(self, version: EngineVersion) -> Any:
        def on_progress(phase: str, fraction: float) -> None:
            if version.state not in (State.BUILDING, State.LOADING):
                return
            version.phase = phase
            version.progress = max(version.progress, overall_progress(phase, fraction, version.progress))

        return on_progress

    async def _build_and_load(self, version: EngineVersion) -> None:
        started = time.monotonic()
        try:
            meta = self._committed_meta(version.cache_key)
            if meta is not None:
                self.metrics.builds.labels("cached").inc()
            else:
                meta = await self._build_once(version)
                self.metrics.builds.labels("succeeded").inc()
                self.metrics.build_duration.observe(time.monotonic() - started)
            if version.state != State.BUILDING:
                return  # deleted while building
            try:
                await self._load(version, meta)
            except StoreCorrupted as exc:
                # The artifact passed its checksum but the backend cannot load it
                # (for example a plan recorded for another device): rebuild it once.
                log.warning("%s; rebuilding it from the stored model", exc.message)
                self.store.discard_engine(version.cache_key)
                version.state = State.BUILDING
                meta = await self._build_once(version)
                self.metrics.builds.labels("succeeded").inc()
                if version.state != State.BUILDING:
                    return
                await self._load(version, meta)
        except BuildFailure as failure:
            if version.state == State.UNLOADING or self._shutting_down:
                return  # a shutdown is not the version's fault: its record stays as it was
            self.metrics.builds.labels("failed").inc()
            self.metrics.build_duration.observe(time.monotonic() - started)
            log.warning("build of %s v%d failed: %s", version.name, version.version, failure.message)
            self._set_state(version, State.FAILED, error=failure.to_dict())
        except EngineError as exc:
            if version.state == State.UNLOADING:
                return
            log.warning("loading %s v%d failed: %s", version.name, version.version, exc.message)
            self._set_state(version, State.FAILED, error={"type": exc.kind, "message": exc.message})
        except Exception as exc:
            log.exception("unexpected error while building %s v%d", version.name, version.version)
            if version.state != State.UNLOADING:
                self._set_state(
                    version,
                    State.FAILED,
                    error={
                        "type": "internal",
                        "message": f"{type(exc).__name__}: {exc}",
                    },
                )

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
        while a build runs share it instead of building twice."""
        on_progress = self._progress_handler(version)
        shared = self._inflight.get(version.cache_key)
        if shared is not None:
            version.phase = "waiting for an identical build"
            return await asyncio.shield(shared)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[version.cache_key] = future
        job = BuildJob(
            store_root=str(self.store.root),
            model_sha256=version.model_sha256,
            options=version.options.to_dict(),
            backend=self.backend.name,
            cache_key=version.cache_key,
            batch_sizes=self.batch_sizes(version.options, version.batching),
            backend_kwargs=self.backend_kwargs(),
        )
        try:
            meta = await self.builds.run(job, on_progress, job_id=self._job_id(version))
            future.set_result(meta)
            return meta
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved when nobody else waits
            raise
        finally:
            self._inflight.pop(version.cache_key, None)

    @staticmethod
    def _job_id(version: EngineVersion) -> str:
        return f"{version.name}-{version.version}"

    async def _load(self, version: EngineVersion, meta: dict[str, Any]) -> None:
        version.meta = meta
        version.state = State.LOADING
        version.phase = "load"
        self._refresh_gauges()
        signature = Signature.from_dict(meta["signature"])
        artifact = self.store.artifact_path(version.cache_key, meta)
        instances = version.batching.instances
        runner = await asyncio.to_thread(
            self.backend.load, artifact, signature, version.options, instances=instances
        )
        try:
            max_batch = int(meta["max_batch_size"])
            if self.settings.warmup:
                await asyncio.to_thread(warm_up, runner, meta, {1, max_batch})
        except Exception:
            runner.close()
            raise
        if version.state != State.LOADING:  # deleted meanwhile
            runner.close()
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
        batcher = DynamicBatcher(
            # Every protocol checks each request's feeds before queueing it.
            runner.infer_prechecked,
            batching,
            batchable=signature.batchable,
            observer=self.metrics.engine_observer(version.name, version.version),
            name=f"{version.name}-v{version.version}",
            latency_profile_ms={
                int(size): float(ms) for size, ms in (meta.get("report", {}).get("latency_ms") or {}).items()
            },
        )
        batcher.start()
        version.runner = runner
        version.batcher = batcher
        self._set_state(version, State.READY)
        log.info(
            "engine %s v%d is ready (%s, %s)",
            version.name,
            version.version,
            meta.get("backend"),
            meta.get("precision"),
        )

    # -- restore, delete, shutdown -----------------------------------------------

    async def restore(self) -> None:
        """Bring back the versions recorded in the store. Ready ones are loaded (or
        rebuilt from the stored ONNX when the device or backend changed, or the
        artifact is corrupt); builds a restart interrupted are marked failed."""
        removed = self.store.cleanup_tmp(
            older_than_s=self.settings.build_timeout_s + 600 if self.settings.store_shared else 0.0
        )
        if removed:
            log.info("removed %d leftover temporary files from the store", removed)
        records, problems = self.store.load_records()
        for problem in problems:
            log.warning("unreadable record in the store: %s", problem)
        for record in records:
            try:
                version = EngineVersion.from_record(record)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping a malformed record %s: %s", record.get("name"), exc)
                continue
            self.registry.restore(version)
            if version.state in (State.BUILDING, State.LOADING):
                self._set_state(
                    version,
                    State.FAILED,
                    error={
                        "type": "interrupted",
                        "message": "the server stopped while this version was being built; upload it again",
                    },
                )
            elif version.state == State.READY:
                version.cache_key = self.cache_key(version.model_sha256, version.options)
                version.state = State.BUILDING
                version.phase = "restore"
                self._spawn(self._build_and_load(version))
            elif version.state == State.UNLOADING:
                self.registry.remove(version)
        self._refresh_gauges()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no build or load is running (for tests and start-up)."""
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._tasks

    async def delete(self, version: EngineVersion) -> None:
        """Unload and remove one version; its engine files go when nothing uses them."""
        previous = version.state
        version.state = State.UNLOADING
        if previous in (State.BUILDING, State.LOADING):
            self.builds.cancel(self._job_id(version))
        batcher, runner = version.batcher, version.runner
        version.batcher = version.runner = None
        if batcher is not None:
            await batcher.stop(drain_timeout_s=min(self.settings.drain_timeout_s, 5.0))
        if runner is not None:
            await asyncio.to_thread(runner.close)
        self.metrics.forget_engine(version.name, version.version)
        self.registry.remove(version)
        self._collect_garbage(version)
        self._refresh_gauges()

    def _collect_garbage(self, version: EngineVersion) -> None:
        records = self.registry.all_versions()
        if (
            version.cache_key not in {v.cache_key for v in records}
            and version.cache_key not in self._inflight
        ):
            self.store.discard_engine(version.cache_key)
        if version.model_sha256 not in {v.model_sha256 for v in records}:
            self.store.model_path(version.model_sha256).unlink(missing_ok=True)

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Drain every batcher (queued requests finish), stop builds, close runners."""
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
