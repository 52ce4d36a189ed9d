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
from service.lifecycle.manager import EngineManager
from service.lifecycle.registry import EngineVersion, Registry
from service.lifecycle.states import VersionState
from service.metrics import KilnMetrics
from service.protocols.inference import infer
from service.settings import Settings
from tests.models import reference_outputs
from tests.precision_models import DIGITS_INPUT, DIGITS_OUTPUT, train_digits_classifier
from tests.service.lifecycle.held_builds import HeldBuilds

OPTIONS = BuildOptions(precision=Precision.INT8, max_batch_size=8, synthetic_calibration=True)


class Setup:
    def __init__(self, root: Path, model: Path) -> None:
        self.settings = Settings(store=root / "store", backend="onnxruntime")
        self.store = EngineStore(self.settings.store)
        self.sha256 = sha256_file(model)
        self.store.add_model(Path(shutil.copy(model, root / "upload.onnx")), self.sha256)
        self.builds = HeldBuilds()
        self.manager = self.start()

    def start(self) -> EngineManager:
        return EngineManager(
            self.settings,
            self.store,
            Registry(self.store),
            OnnxRuntimeBackend(intra_op_threads=1),
            KilnMetrics(),
            self.builds,  # type: ignore[arg-type]
        )

    def create(self) -> EngineVersion:
        return self.manager.create(
            "digits", self.sha256, "digits.onnx", OPTIONS, BatchingConfig(), progressive=True
        )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    model, _, _ = train_digits_classifier(tmp_path)
    result = Setup(tmp_path, model)
    yield result
    await result.manager.shutdown(0.5)


async def wait_for(version: EngineVersion, state: VersionState, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while version.state != state:
            await asyncio.sleep(0.01)


def rows() -> dict[str, np.ndarray]:
    return {DIGITS_INPUT: np.random.default_rng(0).random((3, 64), dtype=np.float32)}


async def test_deleting_a_version_on_its_baseline_cancels_its_build_and_closes_the_baseline(
    setup: Setup,
) -> None:
    version = setup.create()
    await wait_for(version, VersionState.BASELINE)
    runner = version.runner
    assert runner is not None and version.batcher is not None
    await infer(version, rows())
    await setup.manager.delete(version)
    assert len(setup.builds.cancelled) == 1
    assert runner._closed and version.batcher is None and version.runner is None
    assert setup.manager.registry.names() == []
    assert await setup.manager.wait_idle(10)


async def test_a_failed_build_keeps_the_baseline_serving_with_the_error(setup: Setup) -> None:
    setup.builds.fail = BuildFailure("build_crashed", "the build process was terminated by SIGKILL")
    version = setup.create()
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
    # The record says fallback: a restart serves it again (and tries its optimized engine again).
    assert setup.store.load_records()[0][0]["state"] == "fallback"
    assert setup.manager.metrics.fallback.labels(version.name, str(version.version))._value.get() == 1


async def test_a_version_on_its_baseline_when_the_server_stopped_comes_back_servable(setup: Setup) -> None:
    version = setup.create()
    await wait_for(version, VersionState.BASELINE)
    assert setup.store.load_records()[0][0]["state"] == "baseline"
    await setup.manager.shutdown(0.5)  # the held build never ran

    setup.builds = HeldBuilds()
    setup.manager = setup.start()
    await setup.manager.restore()
    (restored,) = setup.manager.registry.all_versions()
    await wait_for(restored, VersionState.BASELINE)
    await infer(restored, rows())
    setup.builds.release.set()
    await wait_for(restored, VersionState.READY)
    assert restored.serving is not None
    assert (restored.serving.tier, restored.serving.precision) == ("optimized", "int8")
    await infer(restored, rows())
