"""The GPU path of progressive engines, against fakes: on a host where ONNX Runtime
lists the CUDA provider (onnxruntime-gpu), a version serves on the CUDA provider
at once; its TensorRT engine (the fake TensorRT and CUDA runtime of tests/fakes)
then builds and swaps in while requests flow, none failing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.backends.tensorrt import TensorRTBackend
from engines.baseline import CUDA_QUICK_START
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions
from service.batching import BatchingConfig
from service.lifecycle.registry import EngineVersion
from service.lifecycle.states import VersionState
from service.protocols.inference import infer
from service.settings import Settings
from tests.fakes.install import install_fake_gpu
from tests.fakes.onnxruntime_gpu import CPU_PROVIDER, CUDA_PROVIDER, install_fake_onnxruntime_gpu
from tests.models import reference_outputs
from tests.precision_models import DIGITS_INPUT, DIGITS_OUTPUT, train_digits_classifier
from tests.service.lifecycle.harness import start_lifecycle
from tests.service.lifecycle.held_builds import HeldBuilds


async def wait_for(version: EngineVersion, state: VersionState, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while version.state != state:
            assert version.state != VersionState.FAILED, version.error
            await asyncio.sleep(0.01)


async def test_cuda_provider_baseline_then_a_tensorrt_engine_swaps_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu = install_fake_gpu(monkeypatch)
    sessions = install_fake_onnxruntime_gpu(monkeypatch)
    model, _, x_test = train_digits_classifier(tmp_path)
    feeds = {DIGITS_INPUT: x_test[:4]}
    expected = reference_outputs(model, feeds)[DIGITS_OUTPUT]

    settings = Settings(store=tmp_path / "store", backend="tensorrt")
    store = EngineStore(settings.store)
    sha256 = sha256_file(model)
    store.add_model(Path(shutil.copy(model, tmp_path / "upload.onnx")), sha256)
    builds = HeldBuilds()
    running = await start_lifecycle(settings, store, TensorRTBackend(), builds)
    version = await running.manager.register(
        "digits",
        sha256,
        "digits.onnx",
        BuildOptions(max_batch_size=8),
        BatchingConfig(max_batch_size=8),
        progressive=True,
    )

    await wait_for(version, VersionState.BASELINE)
    assert version.serving is not None
    assert (version.serving.tier, version.serving.backend, version.serving.provider) == (
        "baseline",
        "onnxruntime",
        CUDA_PROVIDER,
    )
    assert [(CUDA_PROVIDER, CUDA_QUICK_START), CPU_PROVIDER] in sessions.created
    np.testing.assert_allclose((await infer(version, feeds))[DIGITS_OUTPUT], expected, rtol=1e-5, atol=1e-6)

    stop = asyncio.Event()
    answers: list[np.ndarray] = []

    async def client() -> None:
        while not stop.is_set():
            answers.append((await infer(version, feeds))[DIGITS_OUTPUT])

    clients = [asyncio.create_task(client()) for _ in range(4)]
    builds.release.set()
    await wait_for(version, VersionState.READY)
    served_before = len(answers)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*clients)  # any failed request raises here
    assert len(answers) > served_before, "no request ran on the TensorRT engine"

    assert version.serving is not None and version.error is None
    assert (version.serving.tier, version.serving.backend, version.serving.precision) == (
        "optimized",
        "tensorrt",
        "fp32",
    )
    assert type(version.runner).__name__ == "TensorRTRunner"
    for output in answers:
        np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5)
    await running.stop()
    assert gpu.violations() == []
