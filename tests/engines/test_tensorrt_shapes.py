"""The whole build pipeline on the TensorRT backend (fakes of tensorrt and cuda): a
model whose dynamic dimension only takes sizes from 4 up builds, is profiled at its
`opt` shape and loads. With synthetic inputs of size 1 the profile phase used to fail:
TensorRT rejects shapes below the optimization profile's minimum."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.backends.tensorrt import TensorRTBackend
from engines.build import BuildJob, run_build, warm_up_engine
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, ShapeRange, Signature, engine_cache_key
from tests.engines.test_tensorrt_backend import tokens_model
from tests.fakes.install import TENSORRT_10, TENSORRT_11, FakeGpu, install_fake_gpu


@pytest.fixture(params=[TENSORRT_10, TENSORRT_11], ids=["trt10", "trt11"])
def gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    fake = install_fake_gpu(monkeypatch, tensorrt_version=request.param)
    yield fake
    assert fake.violations() == []


def test_a_profile_minimum_above_one_builds_profiles_at_opt_and_loads(gpu: FakeGpu, tmp_path: Path) -> None:
    model = tokens_model(tmp_path / "tokens.onnx")
    store = EngineStore(tmp_path / "store")
    sha = sha256_file(model)
    temp = store.temp_path()
    shutil.copyfile(model, temp)
    store.add_model(temp, sha)
    options = BuildOptions(max_batch_size=4, shapes=(ShapeRange("tokens", (1, 4), (1, 16), (1, 32)),))
    backend = TensorRTBackend()
    key = engine_cache_key(sha, options, backend.device_signature())

    meta = run_build(BuildJob(str(store.root), sha, options.to_dict(), "tensorrt", key, (1, 4)))

    report = meta["report"]
    assert report["shapes"]["tokens"] == {
        "min": [1, 4],
        "opt": [2, 16],
        "max": [4, 32],
        "source": "shapes option",
    }
    assert set(report["latency_ms"]) == {"1", "4"} and report["skipped"] == {}
    signature = Signature.from_dict(meta["signature"])
    runner = backend.load(store.artifact_path(meta["cache_key"], meta), signature, options)
    try:
        assert warm_up_engine(runner, meta, {1, 4}) is None
        feeds = {"tokens": np.ones((2, 16), dtype=np.float32)}
        np.testing.assert_array_equal(runner.infer(feeds)["scaled"], feeds["tokens"] * 3)
    finally:
        runner.close()
