"""One contract test per finding of the audit of the GPU path against the real APIs.

Each test is named after its finding (shared/docs/TRT_AUDIT.md, numbered as
there) and runs against the fakes in tests/fakes/, which raise, clamp and fault
where TensorRT and the CUDA runtime do (each rule cites its source there). Every
test here failed on the backend as it was before the fixes. Finding 7 (INT8 Q/DQ
placement) belongs to the precision recipe and is tested with it; finding 9
(NVML) is in tests/service/test_gpu_metrics.py.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.backends import select_backend
from engines.backends.tensorrt import TensorRTBackend, TensorRTExecutionError, fusion_report, split_artifact
from engines.backends.tensorrt import library as trt_library
from engines.build import BuildJob, run_build, warm_up_engine
from engines.errors import BackendUnavailable, BuildFailed, DeviceLost, InvalidInput, UnsupportedModel
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, ShapeRange, Signature, TensorSpec, engine_cache_key
from tests.engines.test_tensorrt_backend import (
    MLP,
    TOKENS,
    build,
    load_mlp,
    nonzero_model,
    random_feeds,
    save,
    tokens_model,
)
from tests.fakes.cudart import FakeCudaRuntime, cudaError_t
from tests.fakes.install import TENSORRT_11, FakeGpu, install_fake_gpu

SLICED = Signature(
    (TensorSpec("a", "float32", (-1, 16)), TensorSpec("b", "float32", (-1, -1))),
    (TensorSpec("y", "float32", (-1, -1)),),
    batchable=True,
)
SLICED_RANGES = (ShapeRange("b", (1, 1), (1, 4), (1, 8)),)
PAIRED = Signature(
    (TensorSpec("ids", "float32", (-1, -1)), TensorSpec("mask", "float32", (-1, -1))),
    (TensorSpec("sum", "float32", (-1, -1)),),
    batchable=True,
)
PAIRED_RANGES = (
    ShapeRange("ids", (1, 1), (1, 8), (1, 16)),
    ShapeRange("mask", (1, 1), (1, 8), (1, 16)),
)


def sliced_model(path: Path) -> Path:
    """y = a[:, len(b):]: the output is largest when ``b`` is shortest, not at the profile's max."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["b"], ["b_shape"], name="shape_b"),
            helper.make_node("Gather", ["b_shape", "one"], ["start"], name="length_b"),
            helper.make_node("Slice", ["a", "start", "end", "axis"], ["y"], name="slice_a"),
        ],
        "sliced",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "n"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "m"])],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
            numpy_helper.from_array(np.array([16], dtype=np.int64), "end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        ],
    )
    return save(graph, path)


def paired_model(path: Path) -> Path:
    """ids + mask, both [batch, seq]: TensorRT makes the shared ``seq`` one dimension."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "mask"], ["sum"], name="add")],
        "paired",
        [
            helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", "seq"])],
    )
    return save(graph, path)


def run_tensorrt_build(store: EngineStore, model: Path, options: BuildOptions) -> dict[str, Any]:
    sha = sha256_file(model)
    temp = store.temp_path()
    shutil.copyfile(model, temp)
    store.add_model(temp, sha)
    key = engine_cache_key(sha, options, TensorRTBackend().device_signature())
    return run_build(BuildJob(str(store.root), sha, options.to_dict(), "tensorrt", key, (1, 8)))


# -- 1 -------------------------------------------------------------------------------------------


def test_finding_1_dynamic_dim_with_minimum_above_one_builds_profiles_at_opt_and_loads(
    gpu: FakeGpu, tmp_path: Path
) -> None:
    store = EngineStore(tmp_path / "store")
    model = tokens_model(tmp_path / "tokens.onnx")
    options = BuildOptions(max_batch_size=8, shapes=(ShapeRange("tokens", (1, 8), (4, 64), (8, 128)),))
    meta = run_tensorrt_build(store, model, options)
    profiled = [shapes["tokens"] for shapes in gpu.trt.executed_shapes]
    assert profiled and {shape[1] for shape in profiled} == {64}, "profiled at the profile's opt"
    assert {shape[0] for shape in profiled} == {1, 8}

    runner = TensorRTBackend().load(store.artifact_path(meta["cache_key"], meta), TOKENS, options)
    try:
        gpu.trt.executed_shapes.clear()
        assert warm_up_engine(runner, meta, {1, 8}) is None
        assert {shapes["tokens"] for shapes in gpu.trt.executed_shapes} == {(1, 64), (8, 64)}
    finally:
        runner.close()


# -- 2 -------------------------------------------------------------------------------------------


def test_finding_2_output_is_sized_from_infer_shapes_before_any_kernel_runs(
    gpu: FakeGpu, tmp_path: Path
) -> None:
    model = sliced_model(tmp_path / "sliced.onnx")
    backend, artifact, _ = build(gpu, model, SLICED, tmp_path, BuildOptions(shapes=SLICED_RANGES))
    runner = backend.load(artifact, SLICED, BuildOptions(shapes=SLICED_RANGES))
    try:
        rng = np.random.default_rng(0)
        # Buffers were sized at b's longest (8): y is [8, 8]. A one-long b gives y [8, 15].
        feeds = {
            "a": rng.standard_normal((8, 16)).astype(np.float32),
            "b": np.zeros((8, 1), np.float32),
        }
        got = runner.infer(feeds)
        np.testing.assert_array_equal(got["y"], feeds["a"][:, 1:])
        assert set(got) == {"y"} and got["y"].shape == (8, 15)
    finally:
        runner.close()
    # The fixture fails the test if a kernel wrote outside its buffer (an illegal address).


# -- 3 -------------------------------------------------------------------------------------------


def test_finding_3_inconsistent_input_shapes_are_the_clients_bad_input(gpu: FakeGpu, tmp_path: Path) -> None:
    model = paired_model(tmp_path / "paired.onnx")
    options = BuildOptions(shapes=PAIRED_RANGES)
    backend, artifact, _ = build(gpu, model, PAIRED, tmp_path, options)
    runner = backend.load(artifact, PAIRED, options)
    try:
        feeds = {"ids": np.ones((2, 5), np.float32), "mask": np.ones((2, 7), np.float32)}
        with pytest.raises(InvalidInput, match=r"TensorRT cannot run these input shapes together.*'ids'"):
            runner.infer(feeds)
        same = {"ids": np.ones((2, 7), np.float32), "mask": np.ones((2, 7), np.float32)}
        np.testing.assert_array_equal(runner.infer(same)["sum"], np.full((2, 7), 2, np.float32))
    finally:
        runner.close()


def test_finding_3_a_range_tensorrt_refuses_is_build_failed(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TensorRT's set_shape raises RuntimeError (not ValueError); kiln's own check normally
    # catches the range first, so bypass it to reach TensorRT's.
    import engines.backends.tensorrt.builder as builder_module

    monkeypatch.setattr(
        builder_module, "optimization_profile", lambda *args: {"x": ((1, 16), (8, 16), (4, 16))}
    )
    with pytest.raises(BuildFailed, match=r"TensorRT rejected the shape range of input 'x'.*inconsistent"):
        build(gpu, model_files["mlp"], MLP, tmp_path)


# -- 4 -------------------------------------------------------------------------------------------


def test_finding_4_cache_key_follows_tensorrt_and_its_cuda_not_cuda_python_or_the_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def signature(runtime: int, driver: int, flavour: str) -> Any:
        install_fake_gpu(
            monkeypatch,
            tensorrt_version=TENSORRT_11,
            cudart=FakeCudaRuntime(runtime_version=runtime, driver_version=driver),
        )
        monkeypatch.setattr(
            trt_library, "_installed_distributions", lambda: [(f"tensorrt_{flavour}_bindings", TENSORRT_11)]
        )
        trt_library.cuda_flavour.cache_clear()
        return TensorRTBackend().device_signature()

    base = signature(13000, 13000, "cu13")
    assert base.device["tensorrt_cuda"] == "cu13"
    assert "cuda_runtime_version" not in base.device and "driver_version" not in base.device
    options = BuildOptions()
    key = engine_cache_key("0" * 64, options, base)
    # A cuda-python upgrade or a newer driver branch does not orphan every engine...
    assert engine_cache_key("0" * 64, options, signature(13040, 13020, "cu13")) == key
    # ...but TensorRT's CUDA 12 build of the same release is a different engine.
    assert engine_cache_key("0" * 64, options, signature(13000, 13000, "cu12")) != key


# -- 5 -------------------------------------------------------------------------------------------


def test_finding_5_errors_are_reported_per_call(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    feeds = random_feeds(MLP, 2, np.random.default_rng(0))
    try:
        gpu.trt.enqueue_error = "first call's failure"
        with pytest.raises(TensorRTExecutionError, match="first call's failure"):
            runner.infer(feeds)
        gpu.trt.enqueue_error = ""  # fails without a word
        with pytest.raises(TensorRTExecutionError) as second:
            runner.infer(feeds)
        assert "first call's failure" not in second.value.message
        assert "no reason logged" in second.value.message
        # Another thread's messages are not this call's either.
        error = gpu.trt.module.ILogger.Severity.ERROR
        other_thread = threading.Thread(target=lambda: runner._logger.log(error, "another thread's failure"))
        other_thread.start()
        other_thread.join()
        with pytest.raises(TensorRTExecutionError) as third:
            runner.infer(feeds)
        assert "another thread's failure" not in third.value.message
    finally:
        gpu.trt.enqueue_error = None
        runner.close()


# -- 6 -------------------------------------------------------------------------------------------


def test_finding_6_a_sticky_cuda_error_is_device_lost_for_every_later_call(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    feeds = random_feeds(MLP, 2, np.random.default_rng(0))
    runner.infer(feeds)
    gpu.cudart.fault(cudaError_t.cudaErrorIllegalAddress)
    with pytest.raises(DeviceLost, match="cudaErrorIllegalAddress") as lost:
        runner.infer(feeds)
    assert lost.value.kind == "device_lost"
    calls = len(gpu.cudart.calls)
    with pytest.raises(DeviceLost):
        runner.infer(feeds)
    assert len(gpu.cudart.calls) == calls, "a lost device is not touched again"
    runner.close()


# -- 8 -------------------------------------------------------------------------------------------


def test_finding_8_auto_says_when_a_visible_gpu_is_unusable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_fake_gpu(
        monkeypatch, cudart=FakeCudaRuntime(device_count_error=cudaError_t.cudaErrorInsufficientDriver)
    )
    monkeypatch.setattr("engines.backends.gpu_visible", lambda: True)
    with caplog.at_level(logging.WARNING, logger="engines.backends"):
        backend, reason = select_backend("auto")
    assert backend.name == "onnxruntime"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("GPU is visible" in w and "driver" in w and "gpu-cu12" in w for w in warnings), warnings
    assert "driver" in reason


def test_finding_8_the_gpu_extras_say_which_cuda_and_driver_they_need() -> None:
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    assert any(req.startswith("tensorrt-cu13") for req in extras["gpu"])
    assert "cuda-python>=13.0,<14" in extras["gpu"]
    assert any(req.startswith("tensorrt-cu12") for req in extras["gpu-cu12"])
    assert "cuda-python>=12.6,<13" in extras["gpu-cu12"]
    assert "R580" in text, "the driver the gpu extra needs is stated"


# -- 10 ------------------------------------------------------------------------------------------


def test_finding_10a_data_dependent_outputs_are_refused_at_build(gpu: FakeGpu, tmp_path: Path) -> None:
    model = nonzero_model(tmp_path / "nonzero.onnx")
    signature = Signature(
        (TensorSpec("x", "float32", (-1, 4)),), (TensorSpec("where", "int64", (2, -1)),), batchable=False
    )
    options = BuildOptions(shapes=(ShapeRange("x", (1, 4), (4, 4), (8, 4)),))
    with pytest.raises(UnsupportedModel, match="output 'where' has a data-dependent shape"):
        build(gpu, model, signature, tmp_path, options)
    gc.collect()
    assert gpu.cudart.live() == {"device": 0, "pinned": 0, "streams": 0}
    assert gpu.trt.live_objects() == {"contexts": 0, "engines": 0}


def test_finding_10b_probe_checks_the_configured_device(gpu: FakeGpu) -> None:
    with pytest.raises(BackendUnavailable, match="CUDA device 1"):
        select_backend("tensorrt", {"tensorrt": {"device_index": 1}})
    backend, _ = select_backend("tensorrt", {"tensorrt": {"device_index": 0}})
    assert backend.name == "tensorrt"


def test_finding_10c_an_invalid_profile_index_is_build_failed(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu.trt.module.IBuilderConfig, "add_optimization_profile", lambda self, profile: -1)
    with pytest.raises(BuildFailed, match="refused the optimization profile"):
        build(gpu, model_files["mlp"], MLP, tmp_path)


def test_finding_10c_a_refused_tensor_address_stops_the_batch(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    try:
        monkeypatch.setattr(
            gpu.trt.module.IExecutionContext, "set_tensor_address", lambda self, name, memory: False
        )
        runs = gpu.trt.executions
        with pytest.raises(TensorRTExecutionError, match="refused the address of 'x'"):
            runner.infer(random_feeds(MLP, 2, np.random.default_rng(0)))
        assert gpu.trt.executions == runs
    finally:
        runner.close()


def test_finding_10d_the_plan_starts_on_a_4_kib_boundary(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    _, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    data = artifact.read_bytes()
    metadata, plan = split_artifact(data)
    assert metadata is not None
    offset = len(data) - plan.nbytes
    assert offset % 4096 == 0
    assert bytes(plan).startswith(b"FAKEPLAN")


def test_finding_10e_build_memory_is_released_before_inspection(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    _, _, report = build(gpu, model_files["mlp"], MLP, tmp_path)
    assert "error" not in report["fusion"]
    assert gpu.trt.build_objects_at_deserialize == [0], "builder, network, parser, config all gone"


def test_finding_10f_fusion_report_dedupes_nodes_and_cuts_function_suffixes() -> None:
    info = {
        "Layers": [
            {
                "Name": "conv1",
                "LayerType": "CaskConvolution",
                "Metadata": "[ONNX Layer: conv1]\x1f[ONNX Layer: conv1]",
            },
            {
                "Name": "gelu_fn",
                "LayerType": "PointWise",
                "Metadata": "[ONNX Layer: mlp/act | gelu_inner (Gelu)]\x1f[ONNX Layer: mlp/act | erf (Gelu)]",
            },
            {
                "Name": "fc + relu",
                "LayerType": "CaskGemm",
                "Metadata": "[ONNX Layer: fc]\x1f[ONNX Layer: relu]\x1f[ONNX Layer: fc]",
            },
        ]
    }
    report = fusion_report(json.dumps(info), network_layers=4)
    assert report["fused_layer_count"] == 1
    assert report["fused_layers"][0]["nodes"] == ["fc", "relu"]


def test_finding_10g_a_discarded_timing_cache_is_reported_as_not_loaded(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    cache_path = tmp_path / "device.cache"
    cache_path.write_bytes(b"\x00 torn write \x00")
    _, _, report = build(gpu, model_files["mlp"], MLP, tmp_path, timing_cache_path=cache_path)
    timing = report["timing_cache"]
    assert timing["loaded_bytes"] == 0
    assert any("discarded" in warning for warning in timing["warnings"]), timing
    assert json.loads(cache_path.read_bytes())["entries"], "the new measurements were saved"


# -- the fakes themselves ------------------------------------------------------------------------


def test_the_fakes_fault_like_the_real_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_fake_gpu(monkeypatch)
    trt = fake.trt.module
    logger = trt.Logger()
    builder = trt.Builder(logger)
    profile = builder.create_optimization_profile()
    with pytest.raises(RuntimeError, match="inconsistent"):
        profile.set_shape("x", (1, 4), (8, 4), (4, 4))
    profile.set_shape("not_an_input", (1,), (1,), (1,))  # only the builder checks names
    config = builder.create_builder_config()
    config.builder_optimization_level = 9
    assert config.builder_optimization_level == 5
    assert config.create_timing_cache(b"garbage") is not None
    cudart = fake.cudart
    cudart.fault(cudaError_t.cudaErrorIllegalAddress)
    assert cudart.module.cudaGetDeviceCount()[0] == cudaError_t.cudaErrorIllegalAddress
