"""Putting engines into versions and taking them out: load and warm up an engine,
serve a version on it (its batcher), swap a warm engine into a serving version,
close a version's engine. One unit that loads or unloads a version's engine on
demand; it changes no state (``EngineManager.transition`` does, around it).

With progressive engines a version first serves on its baseline engine (the
upload at FP32 on ONNX Runtime); ``swap`` later puts the optimized engine into
the same batcher: new batches run on it, running ones finish on the baseline,
which is then closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from engines.backends.base import Backend, Runner
from engines.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner
from engines.baseline import load_baseline
from engines.build import warm_up, warm_up_engine
from engines.errors import EngineError
from engines.onnx_model import load_model, read_signature
from engines.shapes import resolve_shapes
from engines.store import EngineStore
from engines.types import Signature
from service.batching import BatchingConfig, DynamicBatcher
from service.lifecycle.registry import EngineVersion
from service.lifecycle.serving import Serving
from service.metrics import KilnMetrics
from service.settings import Settings

log = logging.getLogger("kiln.engines")


class EngineLoader:
    def __init__(
        self, settings: Settings, store: EngineStore, backend: Backend, metrics: KilnMetrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.metrics = metrics

    async def open(self, version: EngineVersion, meta: dict[str, Any]) -> Runner:
        """Load a committed engine and warm it up (off the event loop)."""
        signature = Signature.from_dict(meta["signature"])
        artifact = self.store.artifact_path(version.cache_key, meta)
        runner = await asyncio.to_thread(
            self.backend.load, artifact, signature, version.options, instances=version.batching.instances
        )
        try:
            if self.settings.warmup:
                await asyncio.to_thread(warm_up_engine, runner, meta, {1, int(meta["max_batch_size"])})
        except Exception:
            runner.close()
            raise
        return runner

    async def open_baseline(self, version: EngineVersion) -> OnnxRuntimeRunner | None:
        """The upload itself as an FP32 engine, warmed up; None (logged) when it cannot
        load or run: the optimized build, which goes on, decides the version's fate."""
        model_path = self.store.model_path(version.model_sha256)
        external_data = self.store.is_package(version.model_sha256)
        runner: OnnxRuntimeRunner | None = None
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
            return None
        return runner

    def serve(self, version: EngineVersion, runner: Runner, meta: dict[str, Any]) -> None:
        """Start the version's batcher on its optimized engine (``meta``)."""
        batching = _fitted(version.batching, int(meta["max_batch_size"]))
        batchable = Signature.from_dict(meta["signature"]).batchable
        version.batcher = self._start_batcher(version, runner, batchable, batching, latency_profile(meta))
        version.runner, version.serving = runner, Serving.optimized(meta, runner)

    def serve_baseline(self, version: EngineVersion, runner: OnnxRuntimeRunner) -> None:
        """Start the version's batcher on its baseline engine."""
        batchable = runner.signature.batchable
        version.batcher = self._start_batcher(version, runner, batchable, version.batching, {})
        version.runner, version.serving = runner, Serving.baseline(runner.provider)

    async def swap(self, version: EngineVersion, runner: Runner, meta: dict[str, Any]) -> Runner | None:
        """Put the warm optimized engine into the version's batcher: new batches run on
        it, running ones finish on the previous engine. Returns that previous runner
        (the caller closes it)."""
        assert version.batcher is not None
        previous = version.runner
        await version.batcher.swap(runner.infer_prechecked, latency_profile_ms=latency_profile(meta))
        version.runner = runner
        version.serving = Serving.optimized(meta, runner)
        return previous

    async def close(self, version: EngineVersion) -> None:
        """Take the version's engine out: its batcher drains (briefly), its runner closes."""
        batcher, runner = version.batcher, version.runner
        version.batcher = version.runner = None
        if batcher is not None:
            await batcher.stop(drain_timeout_s=min(self.settings.drain_timeout_s, 5.0))
        if runner is not None:
            await asyncio.to_thread(runner.close)
        self.metrics.forget_engine(version.name, version.version)

    def _start_batcher(
        self,
        version: EngineVersion,
        runner: Runner,
        batchable: bool,
        batching: BatchingConfig,
        latency_ms: dict[int, float],
    ) -> DynamicBatcher:
        batcher = DynamicBatcher(
            # Every protocol checks each request's feeds before queueing it.
            runner.infer_prechecked,
            batching,
            batchable=batchable,
            observer=self.metrics.engine_observer(version.name, version.version),
            name=f"{version.name}-v{version.version}",
            latency_profile_ms=latency_ms,
            policy=self.settings.queue_policy(),
        )
        batcher.start()
        return batcher


def _fitted(batching: BatchingConfig, max_batch: int) -> BatchingConfig:
    """The upload's batching within the engine's batch limit."""
    if batching.max_batch_size == max_batch:
        return batching
    return replace(
        batching,
        max_batch_size=max_batch,
        preferred_batch_sizes=tuple(size for size in batching.preferred_batch_sizes if size <= max_batch),
    )


def latency_profile(meta: dict[str, Any]) -> dict[int, float]:
    """The build report's latency per batch size (ms), for the adaptive batcher."""
    return {int(size): float(ms) for size, ms in (meta.get("report", {}).get("latency_ms") or {}).items()}


def log_ready(version: EngineVersion, meta: dict[str, Any]) -> None:
    log.info(
        "engine %s v%d is ready (%s, %s)",
        version.name,
        version.version,
        meta.get("backend"),
        meta.get("precision"),
    )


def log_baseline(version: EngineVersion, started: float) -> None:
    assert version.serving is not None
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


def log_swap(version: EngineVersion, before: Serving | None) -> None:
    assert version.serving is not None
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
