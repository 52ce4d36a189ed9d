"""The baseline phase of a version in the manager, on this CPU, with builds held in
the test's hands: servable at once, deleted cleanly, a failure keeps the baseline,
and a restart brings a version that was on its baseline back servable."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, Precision
from service.batching import BatchingConfig
from service.lifecycle.jobs import BuildFailure
from service.lifecycle.registry import EngineVersion
from service.lifecycle.states import VersionState
from service.protocols.inference import infer
from service.settings import Settings
from tests.models import reference_outputs
from tests.precision_models import DIGITS_INPUT, DIGITS_OUTPUT, train_digits_classifier
from tests.service.lifecycle.harness import Running, start_lifecycle
from tests.service.lifecycle.held_builds import HeldBuilds

OPTIONS = BuildOptions(precision=Precision.INT8, max_batch_size=8, synthetic_calibration=True)


class Setup:
    def __init__(self, root: Path, model: Path) -> None:
        # No retries: a failed build stays failed (the baseline serves on).
        self.settings = Settings(store=root / "store", backend="onnxruntime", build_retries=0)
        self.store = EngineStore(self.settings.store)
        self.sha256 = sha256_file(model)
        self.store.add_model(Path(shutil.copy(model, root / "upload.onnx")), self.sha256)
        self.builds = HeldBuilds()

    async def start(self) -> Running:
        self.running = await start_lifecycle(
            self.settings, self.store, OnnxRuntimeBackend(intra_op_threads=1), self.builds
        )
        self.manager = self.running.manager
        return self.running

    async def create(self) -> EngineVersion:
        return await self.manager.register(
            "digits", self.sha256, "digits.onnx", OPTIONS, BatchingConfig(), progressive=True
        )

    async def delete(self, version: EngineVersion) -> None:
        await self.running.catalog.delete_versions(version.name, [version.version])
        await self.running.reconciler.sync()
        await self.manager.unload(version)

    def recorded(self) -> str:
        return str(self.store.load_records()[0][0]["state"])


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    model, _, _ = train_digits_classifier(tmp_path)
    result = Setup(tmp_path, model)
    await result.start()
    yield result
    await result.running.stop()


async def wait_for(version: EngineVersion, state: VersionState, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while version.state != state:
            await asyncio.sleep(0.01)


def rows() -> dict[str, np.ndarray]:
    return {DIGITS_INPUT: np.random.default_rng(0).random((3, 64), dtype=np.float32)}


async def test_deleting_a_version_on_its_baseline_cancels_its_build_and_closes_the_baseline(
    setup: Setup,
) -> None:
    version = await setup.create()
    await wait_for(version, VersionState.BASELINE)
    runner = version.runner
    assert runner is not None and version.batcher is not None
    await infer(version, rows())
    await setup.delete(version)
    assert len(setup.builds.cancelled) == 1
    assert runner._closed and version.batcher is None and version.runner is None
    assert setup.manager.registry.names() == []
    assert await setup.manager.wait_idle(10)


async def test_a_failed_build_keeps_the_baseline_serving_with_the_error(setup: Setup) -> None:
    setup.builds.fail = BuildFailure("build_crashed", "the build process was terminated by SIGKILL")
    version = await setup.create()
    await wait_for(version, VersionState.BASELINE)
    setup.builds.release.set()
    await wait_for(version, VersionState.FALLBACK)
    assert version.error == {
        "type": "build_crashed",
        "message": "the build process was terminated by SIGKILL",
    }
    assert version.serving is not None and version.serving.tier == "baseline"
    model = setup.store.model_path(setup.sha256)
    expected = reference_outputs(model, rows())[DIGITS_OUTPUT]
    np.testing.assert_allclose((await infer(version, rows()))[DIGITS_OUTPUT], expected, rtol=1e-5, atol=1e-6)
    # The catalog says ready (it served): a restart serves it again, on its baseline,
    # while its optimized engine is tried again.
    await wait_until_recorded(setup, "ready")
    assert setup.manager.metrics.fallback.labels(version.name, str(version.version))._value.get() == 1


async def test_a_version_on_its_baseline_when_the_server_stopped_comes_back_servable(setup: Setup) -> None:
    version = await setup.create()
    await wait_for(version, VersionState.BASELINE)
    await wait_until_recorded(setup, "ready")  # it served: a restart waits for it again
    await setup.running.stop()  # the held build never ran

    setup.builds = HeldBuilds()
    await setup.start()
    (restored,) = setup.manager.registry.all_versions()
    assert setup.manager.pending_restores() == [restored]
    await wait_for(restored, VersionState.BASELINE)
    assert setup.manager.pending_restores() == []
    await infer(restored, rows())
    setup.builds.release.set()
    await wait_for(restored, VersionState.READY)
    assert restored.serving is not None
    assert (restored.serving.tier, restored.serving.precision) == ("optimized", "int8")
    await infer(restored, rows())


async def wait_until_recorded(setup: Setup, state: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while setup.recorded() != state:
            await asyncio.sleep(0.01)


async def test_a_crashed_build_is_tried_again_while_the_baseline_serves(tmp_path: Path) -> None:
    model, _, _ = train_digits_classifier(tmp_path)
    setup = Setup(tmp_path, model)
    setup.settings = Settings(
        store=tmp_path / "store", backend="onnxruntime", build_retries=1, build_retry_backoff_s=0.05
    )
    setup.builds.fail_next.append(
        BuildFailure("build_crashed", "the build process was terminated by SIGKILL")
    )
    setup.builds.release.set()
    await setup.start()
    try:
        version = await setup.create()
        await wait_for(version, VersionState.READY)  # never failed: it served on its baseline meanwhile
        assert setup.builds.runs == 2 and version.error is None
        assert version.serving is not None and version.serving.tier == "optimized"
    finally:
        await setup.running.stop()


async def test_kiln_catalog_retry_tries_a_fallback_version_s_engine_again(setup: Setup) -> None:
    setup.builds.fail = BuildFailure("accuracy_rejected", "too far from FP32")
    version = await setup.create()
    setup.builds.release.set()
    await wait_for(version, VersionState.FALLBACK)
    assert setup.builds.runs == 1
    setup.builds.fail = None
    assert await setup.running.catalog.retry_version("digits") == [1]
    await setup.running.reconciler.sync()
    await wait_for(version, VersionState.READY)
    assert setup.builds.runs == 2 and version.serving is not None and version.serving.tier == "optimized"
