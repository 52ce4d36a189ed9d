"""Engine lifecycle: upload → build (child process) → load → warm up → serve → unload.

With progressive engines, a version whose optimized engine is not in the store
first serves on its baseline engine (state ``baseline``); the optimized engine
then builds, loads and warms up beside it and is swapped into the version's
batcher (``ready``). If the optimized engine fails, the version stays on the
baseline (``ready``, with the failure in ``error``).

The manager owns the background tasks of builds and loads (kept in a set so they
are not garbage-collected), and the rules that connect the store, the registry,
the build runner and the batchers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from engines.backends.base import Backend, Runner
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.baseline import load_baseline
from engines.build import BuildJob, overall_progress, synthetic_feeds
from engines.errors import EngineError, StoreCorrupted
from engines.onnx_model import load_model, read_signature
from engines.store import EngineStore
from engines.types import BuildOptions, ShapeRange, Signature, engine_cache_key
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import NotFound, TooManyEngines
from service.lifecycle.jobs import BuildFailure, BuildRunner
from service.lifecycle.registry import EngineVersion, Registry, State
from service.lifecycle.serving import Serving
from service.metrics import KilnMetrics
from service.settings import Settings

log = logging.getLogger("kiln.engines")

# A build or load task owns versions in these states.
BUSY = (State.BUILDING, State.LOADING, State.BASELINE)
# States in which a finished optimized build goes on to load (others: deleted meanwhile).
BUILT = (State.BUILDING, State.BASELINE)


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
        if version.serving is not None:
            self.metrics.set_serving(
                version.name,
                version.version,
                version.serving.tier,
                version.serving.backend,
                version.serving.precision,
            )
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
        *,
        progressive: bool = True,
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
            if version.state in BUSY or version is newest_ready:
                continue
            await self.delete(version)
            excess -= 1

    # -- build and load ------------------------------------------------------------

    def _progress_handler(self, version: EngineVersion) -> Any:
        def on_progress(phase: str, fraction: float) -> None:
            if version.state not in BUSY:
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
                if version.progressive:
                    await self._serve_baseline(version)
                    if version.state not in BUILT:
                        return  # deleted while the baseline loaded
                meta = await self._build_once(version)
                self.metrics.builds.labels("succeeded").inc()
                self.metrics.build_duration.observe(time.monotonic() - started)
            if version.state not in BUILT:
                return  # deleted while building
            try:
                await self._load(version, meta)
            except StoreCorrupted as exc:
                # The artifact passed its checksum but the backend cannot load it
                # (for example a plan recorded for another device): rebuild it once.
                log.warning("%s; rebuilding it from the stored model", exc.message)
                self.store.discard_engine(version.cache_key)
                if version.state == State.LOADING:
                    version.state = State.BUILDING
                meta = await self._build_once(version)
                self.metrics.builds.labels("succeeded").inc()
                if version.state not in BUILT:
                    return
                await self._load(version, meta)
        except BuildFailure as failure:
            if version.state == State.UNLOADING or self._shutting_down:
                return  # a shutdown is not the version's fault: its record stays as it was
            self.metrics.builds.labels("failed").inc()
            self.metrics.build_duration.observe(time.monotonic() - started)
            log.warning("build of %s v%d failed: %s", version.name, version.version, failure.message)
            self._fail(version, failure.to_dict())
        except EngineError as exc:
            if version.state == State.UNLOADING:
                return
            log.warning("loading %s v%d failed: %s", version.name, version.version, exc.message)
            self._fail(version, {"type": exc.kind, "message": exc.message})
        except Exception as exc:
            log.exception("unexpected error while building %s v%d", version.name, version.version)
            if version.state != State.UNLOADING:
                self._fail(version, {"type": "internal", "message": f"{type(exc).__name__}: {exc}"})

    def _fail(self, version: EngineVersion, error: dict[str, Any]) -> None:
        """The optimized engine failed: a version on its baseline keeps serving there
        (ready, with the error); any other fails."""
        if version.state == State.BASELINE:
            log.warning(
                "%s v%d keeps serving on its baseline engine (%s, %s)",
                version.name,
                version.version,
                version.serving.backend if version.serving else "?",
                version.serving.precision if version.serving else "?",
            )
            self._set_state(version, State.READY, error=error)
        else:
            self._set_state(version, State.FAILED, error=error)

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
        if version.state == State.BUILDING:
            version.state = State.LOADING
            self._refresh_gauges()
        version.phase = "load"
        signature = Signature.from_dict(meta["signature"])
        artifact = self.store.artifact_path(version.cache_key, meta)
        instances = version.batching.instances
        runner = await asyncio.to_thread(
            self.backend.load, artifact, signature, version.options, instances=instances
        )
        try:
            max_batch = int(meta["max_batch_size"])
            if self.settings.warmup:
                await asyncio.to_thread(_warm_up, runner, signature, {1, max_batch}, version.options.shapes)
        except Exception:
            runner.close()
            raise
        if version.state not in (State.LOADING, State.BASELINE):  # deleted meanwhile
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
        self._set_state(version, State.READY)
        _log_ready(version, meta)

    async def _serve_baseline(self, version: EngineVersion) -> None:
        """Load the upload itself as the baseline engine, warm it up and serve on it
        (``building`` → ``baseline``). A baseline that cannot load is logged and
        skipped: the optimized build goes on."""
        version.phase = "baseline"
        started = time.monotonic()
        model_path = self.store.model_path(version.model_sha256)
        try:
            signature = await asyncio.to_thread(lambda: read_signature(load_model(model_path)))
            backend = self.backend if isinstance(self.backend, OnnxRuntimeBackend) else None
            runner = await asyncio.to_thread(
                load_baseline,
                model_path,
                signature,
                version.options,
                backend=backend,
                instances=version.batching.instances,
            )
        except EngineError as exc:
            log.warning(
                "%s v%d has no baseline engine (%s); it serves once its optimized engine is ready",
                version.name,
                version.version,
                exc.message,
            )
            version.phase = "queued"
            return
        try:
            if self.settings.warmup:
                await asyncio.to_thread(
                    _warm_up, runner, signature, {1, runner.max_batch_size}, version.options.shapes
                )
        except Exception:
            runner.close()
            raise
        if version.state != State.BUILDING:  # deleted meanwhile
            runner.close()
            return
        version.batcher = self._start_batcher(version, runner, signature, version.batching, {})
        version.runner = runner
        version.serving = Serving.baseline(runner.provider)
        version.phase = "queued"
        self._set_state(version, State.BASELINE)
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
        if version.state != State.BASELINE:  # deleted during the swap: the delete closed the baseline
            await asyncio.to_thread(runner.close)
            return
        version.runner = runner
        version.serving = Serving.optimized(meta, runner)
        self._set_state(version, State.READY)
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
        _log_ready(version, meta)
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
        )
        batcher.start()
        return batcher

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
            elif version.state in (State.READY, State.BASELINE):
                # It was servable: loaded again (its optimized engine rebuilt if need be).
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
        if previous in BUSY:
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


def _warm_up(
    runner: Any, signature: Signature, batch_sizes: set[int], shapes: Sequence[ShapeRange] = ()
) -> None:
    # At the profile's opt: an engine only accepts shapes inside its profile.
    for batch in sorted(batch_sizes):
        runner.infer(synthetic_feeds(signature, batch, shapes=shapes))
