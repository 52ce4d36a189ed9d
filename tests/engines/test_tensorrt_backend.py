"""The TensorRT backend's contract, run here against fakes of tensorrt and cuda.bindings.runtime.

Every test runs once with a fake TensorRT 10.x and once with a fake 11.x (which
lacks everything 11 removed). The fakes enforce what TensorRT documents and record
any breach; the fixture fails a test that left one behind. The fake engine runs
the ONNX with ONNX Runtime on bytes in fake device memory, so results are real.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.backends import cuda
from engines.backends.base import Runner
from engines.backends.tensorrt import (
    ARTIFACT_MAGIC,
    TensorRTBackend,
    TensorRTExecutionError,
    split_artifact,
)
from engines.errors import (
    BackendUnavailable,
    BuildFailed,
    InvalidInput,
    StoreCorrupted,
    UnsupportedModel,
)
from engines.types import BuildOptions, ShapeRange, Signature, TensorSpec
from tests.fakes.cudart import FakeCudaRuntime, cudaError_t
from tests.fakes.install import FakeGpu, install_fake_gpu
from tests.fakes.tensorrt import plan_header
from tests.models import reference_outputs


def batched(name: str, dtype: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, dtype, (-1, *dims))


MLP = Signature((batched("x", "float32", 16),), (batched("y", "float32", 4),), batchable=True)
TWO_IN_TWO_OUT = Signature(
    (batched("a", "float32", 4), batched("b", "float32", 4)),
    (batched("sum", "float32", 4), batched("prod", "float32", 4)),
    batchable=True,
)
EMBEDDING = Signature((batched("ids", "int64", 5),), (batched("pooled", "float32", 8),), batchable=True)
FIXED = Signature(
    (TensorSpec("x", "float32", (1, 6)),),
    (TensorSpec("y", "float32", (1, 3)),),
    batchable=False,
    unbatched_reason="fixed batch of 1",
)
TOKENS = Signature(
    (TensorSpec("tokens", "float32", (-1, -1)),),
    (TensorSpec("scaled", "float32", (-1, -1)),),
    batchable=True,
)


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def tokens_model(path: Path) -> Path:
    """tokens[batch, seq] -> tokens * 3: a second dynamic dim that needs a user range."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["tokens", "three"], ["scaled"], name="scale")],
        "tokens",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", "seq"])],
        initializer=[numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")],
    )
    return save(graph, path)


def mystery_model(path: Path) -> Path:
    """A node TensorRT has no importer for."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu_ok"),
            helper.make_node("KilnMystery", ["r"], ["y"], name="mystery_1", domain="com.example"),
        ],
        "mystery",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
    )
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def nonzero_model(path: Path) -> Path:
    """x[batch, 4] -> NonZero: an output whose shape depends on the values."""
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["where"], name="nonzero")],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("where", TensorProto.INT64, [2, "count"])],
    )
    return save(graph, path)


def build(
    gpu: FakeGpu,
    onnx_path: Path,
    signature: Signature,
    tmp_path: Path,
    options: BuildOptions | None = None,
    **kwargs: Any,
) -> tuple[TensorRTBackend, Path, dict[str, Any]]:
    backend = TensorRTBackend()
    artifact = tmp_path / f"{onnx_path.stem}.plan"
    report = backend.build(onnx_path, signature, options or BuildOptions(), artifact, **kwargs)
    return backend, artifact, report


def load_mlp(gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path) -> Runner:
    """The MLP model built with default options and loaded with one slot."""
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    return backend.load(artifact, MLP, BuildOptions())


def random_feeds(signature: Signature, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in signature.inputs:
        shape = tuple(batch if dim == -1 else dim for dim in spec.shape)
        if spec.dtype == "int64":
            feeds[spec.name] = rng.integers(0, 50, size=shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def assert_matches_reference(model: Path, feeds: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    want = reference_outputs(model, feeds)
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name].shape == array.shape, name
        assert got[name].dtype == array.dtype, name
        np.testing.assert_allclose(got[name], array, rtol=1e-5, atol=1e-6, err_msg=name)


# -- probe and device signature ---------------------------------------------------------


def test_probe_names_tensorrt_version_and_gpu(gpu: FakeGpu) -> None:
    major_minor = ".".join(gpu.trt.version.split(".")[:2])
    assert TensorRTBackend.probe() == (
        True,
        f"TensorRT {major_minor} on NVIDIA Fake H100 80GB HBM3",
    )


def test_probe_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, reason = TensorRTBackend.probe()
    assert not ok
    assert "tensorrt does not import" in reason


def test_probe_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_gpu(
        monkeypatch,
        cudart=FakeCudaRuntime(device_count_error=cudaError_t.cudaErrorInsufficientDriver),
    )
    ok, reason = TensorRTBackend.probe()
    assert not ok
    assert "driver is too old" in reason and "kiln[gpu-cu12]" in reason


def test_probe_never_raises_on_a_broken_install(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("libnvinfer.so.11: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "tensorrt", Broken("tensorrt"))
    ok, reason = TensorRTBackend.probe()
    assert not ok
    assert "libnvinfer" in reason


def test_probe_on_this_machine_answers_without_raising() -> None:
    ok, reason = TensorRTBackend.probe()
    assert reason
    if "tensorrt" not in sys.modules and not ok:
        assert "tensorrt" in reason or "CUDA" in reason


def test_device_signature_has_full_version_gpu_facts_and_platform(gpu: FakeGpu) -> None:
    signature = TensorRTBackend().device_signature()
    assert signature.backend == "tensorrt"
    assert signature.backend_version == gpu.trt.version
    device = signature.device
    assert device["name"] == "NVIDIA Fake H100 80GB HBM3"
    assert device["compute_capability"] == "9.0"
    assert device["multiprocessor_count"] == 132
    assert device["total_memory_bytes"] == 80 * 1024**3
    assert {"tensorrt_cuda", "os", "arch"} <= device.keys()


def test_device_signature_changes_with_the_gpu(gpu: FakeGpu) -> None:
    before = TensorRTBackend().device_signature().key()
    gpu.cudart.devices[0].major = 8
    assert TensorRTBackend().device_signature().key() != before


# -- build --------------------------------------------------------------------------------


def test_build_reports_phases_profile_and_settings(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    phases: list[tuple[str, float]] = []
    options = BuildOptions(max_batch_size=16, workspace_bytes=1 << 30, optimization_level=5)
    _, artifact, report = build(
        gpu, model_files["mlp"], MLP, tmp_path, options, progress=lambda p, f: phases.append((p, f))
    )
    assert phases == [
        ("parse", 0.0),
        ("parse", 1.0),
        ("build", 0.0),
        ("build", 1.0),
        ("inspect", 0.0),
        ("inspect", 1.0),
    ]
    assert report["profile"] == {"x": {"min": [1, 16], "opt": [8, 16], "max": [16, 16]}}
    assert report["strongly_typed"] is True
    assert report["tensorrt_version"] == gpu.trt.version
    built_with = plan_header(bytes(split_artifact(artifact.read_bytes())[1]))
    assert built_with["workspace"] == 1 << 30
    assert built_with["optimization_level"] == 5
    assert built_with["profiling_verbosity"] == "DETAILED"
    strongly_typed = 1 << int(gpu.trt.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert built_with["network_flags"] & strongly_typed
    assert artifact.read_bytes().startswith(ARTIFACT_MAGIC)
    assert report["plan_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == [artifact.name], "no temp files may be left behind"


def test_opt_batch_size_is_used_for_the_profile(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    _, _, report = build(
        gpu, model_files["mlp"], MLP, tmp_path, BuildOptions(max_batch_size=32, opt_batch_size=3)
    )
    assert report["profile"]["x"] == {"min": [1, 16], "opt": [3, 16], "max": [32, 16]}


def test_batch_of_one_gets_opt_one(gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path) -> None:
    _, _, report = build(gpu, model_files["mlp"], MLP, tmp_path, BuildOptions(max_batch_size=1))
    assert report["profile"]["x"] == {"min": [1, 16], "opt": [1, 16], "max": [1, 16]}


def test_build_log_keeps_warnings_but_not_info(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    _, _, report = build(gpu, model_files["mlp"], MLP, tmp_path)
    assert "warning: TF32 math is enabled by default for this fake build" in report["build_log"]
    assert not any("MemUsageChange" in line or "Original:" in line for line in report["build_log"])


def test_no_plan_is_build_failed_with_the_loggers_errors(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    gpu.trt.build_error = "[virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory"
    with pytest.raises(BuildFailed, match=r"could not build an engine: .*OutOfMemory") as caught:
        build(gpu, model_files["mlp"], MLP, tmp_path)
    assert any("OutOfMemory" in line for line in caught.value.details["log"])
    assert not (tmp_path / "mlp.plan").exists()


def test_parser_errors_name_the_node_and_operator(gpu: FakeGpu, tmp_path: Path) -> None:
    model = mystery_model(tmp_path / "mystery.onnx")
    signature = Signature((batched("x", "float32", 16),), (batched("y", "float32", 4),), batchable=True)
    with pytest.raises(
        UnsupportedModel, match=r"node 'mystery_1' \(KilnMystery\): No importer registered"
    ) as caught:
        build(gpu, model, signature, tmp_path)
    (issue,) = caught.value.details["parser_errors"]
    assert issue["node_name"] == "mystery_1"
    assert issue["node_operator"] == "KilnMystery"
    assert issue["node_index"] == 1
    assert "UNSUPPORTED_NODE" in issue["code"]


def test_unparseable_bytes_are_build_failed(gpu: FakeGpu, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(BuildFailed, match="parser rejected the model: the graph: Failed to parse"):
        build(gpu, garbage, MLP, tmp_path)


def test_dynamic_non_batch_dim_without_a_range_says_what_to_pass(gpu: FakeGpu, tmp_path: Path) -> None:
    model = tokens_model(tmp_path / "tokens.onnx")
    with pytest.raises(BuildFailed, match=r"input 'tokens' .* dynamic dimension 1.*`shapes`"):
        build(gpu, model, TOKENS, tmp_path)


def test_user_ranges_fill_dynamic_dims_and_bound_requests(gpu: FakeGpu, tmp_path: Path) -> None:
    model = tokens_model(tmp_path / "tokens.onnx")
    options = BuildOptions(max_batch_size=8, shapes=(ShapeRange("tokens", (1, 4), (2, 16), (8, 32)),))
    backend, artifact, report = build(gpu, model, TOKENS, tmp_path, options)
    # Axis 0 follows the batching limits, not the values in the range.
    assert report["profile"] == {"tokens": {"min": [1, 4], "opt": [4, 16], "max": [8, 32]}}
    runner = backend.load(artifact, TOKENS, options)
    try:
        feeds = {"tokens": np.arange(30, dtype=np.float32).reshape(3, 10)}
        np.testing.assert_array_equal(runner.infer(feeds)["scaled"], feeds["tokens"] * 3)
        with pytest.raises(InvalidInput, match=r"dimension 1 must be within 4\.\.32"):
            runner.infer({"tokens": np.zeros((2, 40), dtype=np.float32)})
    finally:
        runner.close()


def test_range_must_agree_with_fixed_dims(gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path) -> None:
    options = BuildOptions(shapes=(ShapeRange("x", (1, 8), (4, 16), (8, 16)),))
    with pytest.raises(BuildFailed, match="dimension 1, which the model fixes at 16"):
        build(gpu, model_files["mlp"], MLP, tmp_path, options)


def test_range_for_an_unknown_input(gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path) -> None:
    options = BuildOptions(shapes=(ShapeRange("nope", (1,), (1,), (1,)),))
    with pytest.raises(BuildFailed, match=r"input\(s\) \['nope'\] that the model does not have"):
        build(gpu, model_files["mlp"], MLP, tmp_path, options)


def test_range_out_of_order(gpu: FakeGpu, tmp_path: Path) -> None:
    model = tokens_model(tmp_path / "tokens.onnx")
    options = BuildOptions(shapes=(ShapeRange("tokens", (1, 64), (1, 16), (1, 128)),))
    with pytest.raises(BuildFailed, match="0 <= min <= opt <= max, got min=64, opt=16"):
        build(gpu, model, TOKENS, tmp_path, options)


def test_batching_limits_are_checked(gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match="opt_batch_size=9, max_batch_size=8"):
        build(gpu, model_files["mlp"], MLP, tmp_path, BuildOptions(max_batch_size=8, opt_batch_size=9))
    with pytest.raises(BuildFailed, match="max_batch_size must be at least 1"):
        build(gpu, model_files["mlp"], MLP, tmp_path, BuildOptions(max_batch_size=0))
    with pytest.raises(BuildFailed, match="optimization_level must be between 0 and 5"):
        build(gpu, model_files["mlp"], MLP, tmp_path, BuildOptions(optimization_level=7))


def test_fp16_graph_with_fp32_io_builds_and_runs(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    from onnxconverter_common import float16

    fp16 = float16.convert_float_to_float16(onnx.load_model(str(model_files["mlp"])), keep_io_types=True)
    path = tmp_path / "mlp_fp16.onnx"
    onnx.save_model(fp16, str(path))
    backend, artifact, _ = build(gpu, path, MLP, tmp_path)
    runner = backend.load(artifact, MLP, BuildOptions())
    try:
        feeds = random_feeds(MLP, 4, np.random.default_rng(0))
        got = runner.infer(feeds)["y"]
        assert got.dtype == np.float32
        want = reference_outputs(model_files["mlp"], feeds)["y"]
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    finally:
        runner.close()


def test_fp16_io_against_an_fp32_signature_is_refused(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    from onnxconverter_common import float16

    fp16 = float16.convert_float_to_float16(onnx.load_model(str(model_files["mlp"])), keep_io_types=False)
    path = tmp_path / "mlp_fp16_io.onnx"
    onnx.save_model(fp16, str(path))
    with pytest.raises(
        UnsupportedModel,
        match=r"input 'x' is float16 in the TensorRT network but float32.*keep_io_types",
    ):
        build(gpu, path, MLP, tmp_path)


def test_fusion_report_from_the_engine_inspector(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    _, _, report = build(gpu, model_files["mlp"], MLP, tmp_path)
    fusion = report["fusion"]
    assert fusion["network_layers"] == 3
    assert fusion["engine_layers"] == 3  # a reformat, "fc1 + relu1", fc2
    assert fusion["fused_layers"] == [
        {"name": "fc1 + relu1", "layer_type": "CaskGemm", "nodes": ["fc1", "relu1"]}
    ]
    assert fusion["reformat_layers"] == 1
    assert fusion["io_tensors"] == ["x", "y"]
    assert fusion["inspector_layout"] == ("Bindings" if gpu.trt.major < 11 else "I/O Tensors")


# -- timing cache ------------------------------------------------------------------------------


def cache_entries(path: Path) -> set[str]:
    return set(json.loads(path.read_bytes())["entries"])


def test_timing_cache_is_created_then_merged_across_builds(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    cache_path = tmp_path / "timing" / "device.cache"
    _, _, first = build(gpu, model_files["mlp"], MLP, tmp_path, timing_cache_path=cache_path)
    assert first["timing_cache"]["loaded_bytes"] == 0
    assert first["timing_cache"]["written_bytes"] == cache_path.stat().st_size
    assert cache_entries(cache_path) == {"mlp/fc1:Gemm", "mlp/relu1:Relu", "mlp/fc2:Gemm"}

    def another_build_finishes_meanwhile() -> None:
        data = json.loads(cache_path.read_bytes())
        data["entries"]["other/conv:Conv"] = "tactic-9"
        cache_path.write_bytes(json.dumps(data).encode())

    gpu.trt.build_hook = another_build_finishes_meanwhile
    _, _, second = build(
        gpu, model_files["two_in_two_out"], TWO_IN_TWO_OUT, tmp_path, timing_cache_path=cache_path
    )
    assert second["timing_cache"]["loaded_bytes"] > 0
    assert second["timing_cache"]["warnings"] == []
    assert cache_entries(cache_path) == {
        "mlp/fc1:Gemm",
        "mlp/relu1:Relu",
        "mlp/fc2:Gemm",
        "two_in_two_out/add:Add",
        "two_in_two_out/mul:Mul",
        "other/conv:Conv",
    }
    leftovers = [p.name for p in cache_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_timing_cache_from_another_tensorrt_is_replaced(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    cache_path = tmp_path / "device.cache"
    stale = {"version": "9.0.0", "device": "NVIDIA Fake H100 80GB HBM3", "entries": {"old": "x"}}
    cache_path.write_bytes(json.dumps(stale).encode())
    _, _, report = build(gpu, model_files["mlp"], MLP, tmp_path, timing_cache_path=cache_path)
    assert any("does not match" in warning for warning in report["timing_cache"]["warnings"])
    assert json.loads(cache_path.read_bytes())["version"] == gpu.trt.version


# -- load and infer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "signature", "batches"),
    [
        ("mlp", MLP, (1, 3, 8)),
        ("two_in_two_out", TWO_IN_TWO_OUT, (1, 5, 8)),
        ("int64_embedding", EMBEDDING, (2, 7)),
        ("fixed_batch_one", FIXED, (1,)),
    ],
)
def test_round_trip_matches_onnx_runtime(
    gpu: FakeGpu,
    model_files: dict[str, Path],
    tmp_path: Path,
    model: str,
    signature: Signature,
    batches: tuple[int, ...],
) -> None:
    backend, artifact, report = build(gpu, model_files[model], signature, tmp_path)
    runner = backend.load(artifact, signature, BuildOptions(), instances=2)
    try:
        assert runner.max_batch_size == (8 if signature.batchable else 1)
        if not signature.batchable:
            assert report["profile"] == {}
        rng = np.random.default_rng(1)
        for batch in batches:
            feeds = random_feeds(signature, batch, rng)
            assert_matches_reference(model_files[model], feeds, runner.infer(feeds))
        assert gpu.trt.executions == len(batches)
    finally:
        runner.close()


def test_outputs_are_fresh_arrays_owned_by_the_caller(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    try:
        first = runner.infer({"x": np.ones((2, 16), dtype=np.float32)})["y"]
        kept = first.copy()
        runner.infer({"x": np.full((2, 16), -5.0, dtype=np.float32)})
        np.testing.assert_array_equal(first, kept)
        assert first.flags.owndata and first.flags.writeable
    finally:
        runner.close()


def test_concurrent_calls_never_share_a_context(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["two_in_two_out"], TWO_IN_TWO_OUT, tmp_path)
    runner = backend.load(artifact, TWO_IN_TWO_OUT, BuildOptions(), instances=3)
    failures: list[str] = []
    start = threading.Barrier(8)

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        start.wait()
        for _ in range(10):
            batch = int(rng.integers(1, 9))
            feeds = random_feeds(TWO_IN_TWO_OUT, batch, rng)
            got = runner.infer(feeds)
            if not (
                np.allclose(got["sum"], feeds["a"] + feeds["b"])
                and np.allclose(got["prod"], feeds["a"] * feeds["b"])
            ):
                failures.append(f"client {seed} got another request's result")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    runner.close()
    assert failures == []
    assert gpu.trt.executions == 80
    # Each worker thread bound the device itself (the fake also flags any that did not).
    assert {thread.ident for thread in threads} <= gpu.cudart.threads_with_device()


def test_close_frees_every_buffer_and_stream_and_drops_contexts_before_the_engine(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    gc.collect()
    gpu.trt.released.clear()
    runner = backend.load(artifact, MLP, BuildOptions(), instances=3)
    runner.infer({"x": np.ones((1, 16), dtype=np.float32)})
    assert gpu.cudart.live() == {"device": 6, "pinned": 6, "streams": 3}
    runner.close()
    runner.close()
    gc.collect()
    assert gpu.cudart.live() == {"device": 0, "pinned": 0, "streams": 0}
    assert gpu.trt.live_objects() == {"contexts": 0, "engines": 0}
    assert gpu.trt.released == ["context", "context", "context", "engine"]
    with pytest.raises(InvalidInput, match="engine is closed"):
        runner.infer({"x": np.ones((1, 16), dtype=np.float32)})


def test_close_waits_for_running_calls_and_refuses_waiting_ones(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    in_kernel, release = threading.Event(), threading.Event()
    real_sync = gpu.cudart.module.cudaStreamSynchronize

    def slow_sync(stream: Any) -> tuple[Any, ...]:
        in_kernel.set()
        release.wait(timeout=10)
        return real_sync(stream)

    gpu.cudart.module.cudaStreamSynchronize = slow_sync
    results: dict[str, Any] = {}

    def call(name: str) -> None:
        try:
            results[name] = runner.infer({"x": np.ones((2, 16), dtype=np.float32)})
        except InvalidInput as exc:
            results[name] = exc

    running = threading.Thread(target=call, args=("running",))
    running.start()
    assert in_kernel.wait(timeout=10)
    waiting = threading.Thread(target=call, args=("waiting",))
    waiting.start()
    closer = threading.Thread(target=runner.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive(), "close must wait for the running call"
    assert gpu.cudart.live()["device"] == 2
    release.set()
    for thread in (running, waiting, closer):
        thread.join(timeout=10)
    assert isinstance(results["running"], dict)
    assert isinstance(results["waiting"], InvalidInput)
    assert gpu.cudart.live() == {"device": 0, "pinned": 0, "streams": 0}


def test_a_cuda_error_mid_batch_is_raised_and_the_slot_survives(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    try:
        feeds = {"x": np.ones((2, 16), dtype=np.float32)}
        gpu.cudart.fail_calls["cudaMemcpyAsync"] = cudaError_t.cudaErrorMemoryAllocation
        with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
            runner.infer(feeds)
        del gpu.cudart.fail_calls["cudaMemcpyAsync"]
        assert_matches_reference(model_files["mlp"], feeds, runner.infer(feeds))
    finally:
        runner.close()


def test_execute_returning_false_is_an_error(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = load_mlp(gpu, model_files, tmp_path)
    context_class = gpu.trt.module.IExecutionContext

    def refuse(self: Any, stream_handle: int) -> bool:
        self._engine()._logger.log(
            gpu.trt.module.ILogger.Severity.ERROR,
            "Error Code 1: Cuda Runtime (illegal memory access)",
        )
        return False

    monkeypatch.setattr(context_class, "execute_async_v3", refuse)
    try:
        with pytest.raises(
            TensorRTExecutionError, match=r"failed to enqueue the batch: .*illegal memory access"
        ):
            runner.infer({"x": np.ones((1, 16), dtype=np.float32)})
    finally:
        runner.close()


# -- load failures ------------------------------------------------------------------------------


def test_a_none_engine_is_store_corrupted_with_the_loggers_message(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    gpu.trt.deserialize_returns_none = True
    with pytest.raises(
        StoreCorrupted,
        match=r"could not deserialize the engine mlp.plan: .*Magic tag does not match",
    ):
        backend.load(artifact, MLP, BuildOptions())
    assert gpu.cudart.live() == {"device": 0, "pinned": 0, "streams": 0}


def test_garbage_and_truncated_artifacts_are_store_corrupted(gpu: FakeGpu, tmp_path: Path) -> None:
    backend = TensorRTBackend()
    garbage = tmp_path / "garbage.plan"
    garbage.write_bytes(b"not a plan at all")
    with pytest.raises(StoreCorrupted, match="could not deserialize"):
        backend.load(garbage, MLP, BuildOptions())
    truncated = tmp_path / "truncated.plan"
    truncated.write_bytes(ARTIFACT_MAGIC + b"\xff\x00")
    with pytest.raises(StoreCorrupted, match="header is truncated"):
        backend.load(truncated, MLP, BuildOptions())


def test_an_engine_for_another_device_signature_is_never_loaded(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    metadata, _ = split_artifact(artifact.read_bytes())
    assert metadata is not None
    assert metadata["device_signature"] == json.loads(json.dumps(backend.device_signature().to_dict()))
    gpu.cudart.devices[0].major = 8
    with pytest.raises(
        StoreCorrupted,
        match=r"was built for TensorRT .*compute 9\.0.*this machine is .*compute 8\.0.*rebuilt",
    ):
        backend.load(artifact, MLP, BuildOptions())


def test_a_bare_plan_without_kiln_header_loads(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    _, plan = split_artifact(artifact.read_bytes())
    bare = tmp_path / "bare.plan"
    bare.write_bytes(bytes(plan))
    runner = backend.load(bare, MLP, BuildOptions())
    try:
        feeds = {"x": np.ones((2, 16), dtype=np.float32)}
        assert_matches_reference(model_files["mlp"], feeds, runner.infer(feeds))
    finally:
        runner.close()


def test_context_creation_failure_frees_what_was_made(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    gpu.trt.max_contexts = 2
    with pytest.raises(BackendUnavailable, match="could not create an execution context"):
        backend.load(artifact, MLP, BuildOptions(), instances=3)
    gc.collect()
    assert gpu.cudart.live() == {"device": 0, "pinned": 0, "streams": 0}
    assert gpu.trt.live_objects() == {"contexts": 0, "engines": 0}


def test_an_artifact_for_another_model_is_refused(
    gpu: FakeGpu, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend, artifact, _ = build(gpu, model_files["mlp"], MLP, tmp_path)
    with pytest.raises(
        StoreCorrupted,
        match=r"inputs \['x'\] and outputs \['y'\] do not match the model's \['a', 'b'\]",
    ):
        backend.load(artifact, TWO_IN_TWO_OUT, BuildOptions())


def test_build_and_load_need_tensorrt(
    monkeypatch: pytest.MonkeyPatch, model_files: dict[str, Path], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    backend = TensorRTBackend()
    with pytest.raises(BackendUnavailable, match="tensorrt does not import"):
        backend.build(model_files["mlp"], MLP, BuildOptions(), tmp_path / "x.plan")
    with pytest.raises(BackendUnavailable, match="tensorrt does not import"):
        backend.load(tmp_path / "x.plan", MLP, BuildOptions())
