"""Building real engines with the ONNX Runtime backend and checking their outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import BuildJob, run_build
from engines.shapes import synthetic_inputs
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, Signature, engine_cache_key
from tests.models import reference_outputs


def build(store: EngineStore, model: Path, options: BuildOptions | None = None) -> dict:
    options = options or BuildOptions(max_batch_size=8)
    sha = sha256_file(model)
    temp = store.temp_path()
    shutil.copyfile(model, temp)
    store.add_model(temp, sha)
    backend = OnnxRuntimeBackend()
    key = engine_cache_key(sha, options, backend.device_signature())
    phases: list[str] = []
    meta = run_build(
        BuildJob(str(store.root), sha, options.to_dict(), "onnxruntime", key, (1, 8)),
        lambda phase, fraction: phases.append(phase),
    )
    assert {"validate", "precision", "build", "commit"} <= set(phases)
    return meta


@pytest.mark.parametrize("name", ["mlp", "cnn", "two_in_two_out", "int64_embedding", "fixed_batch_one"])
def test_engine_outputs_equal_onnxruntime_on_the_original(
    name: str, model_files: dict[str, Path], tmp_path: Path
) -> None:
    store = EngineStore(tmp_path)
    meta = build(store, model_files[name])
    signature = Signature.from_dict(meta["signature"])
    runner = OnnxRuntimeBackend().load(
        store.artifact_path(meta["cache_key"], meta), signature, BuildOptions(max_batch_size=8)
    )
    try:
        for batch in (1, 3) if signature.batchable else (1,):
            feeds = synthetic_inputs(signature, None, batch, seed=batch)
            if signature.inputs[0].dtype == "int64":
                feeds = {k: np.random.default_rng(0).integers(0, 50, v.shape) for k, v in feeds.items()}
            got = runner.infer(feeds)
            want = reference_outputs(model_files[name], feeds)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)
    finally:
        runner.close()


def test_build_report_has_fusion_and_latency(model_files: dict[str, Path], tmp_path: Path) -> None:
    meta = build(EngineStore(tmp_path), model_files["mlp"])
    fusion = meta["report"]["fusion"]
    assert fusion["op_counts_before"] == {"Gemm": 2, "Relu": 1}
    # ONNX Runtime fuses Gemm + Relu into one FusedGemm node.
    assert fusion["nodes_after"] < fusion["nodes_before"]
    assert any(node["op_type"] == "FusedGemm" for node in fusion["fused_nodes"])
    assert set(meta["report"]["latency_ms"]) == {"1", "8"}
    assert meta["max_batch_size"] == 8
    assert meta["report"]["timings_s"]["total"] > 0


def test_unbatched_engine_reports_max_batch_one(model_files: dict[str, Path], tmp_path: Path) -> None:
    meta = build(EngineStore(tmp_path), model_files["fixed_batch_one"])
    assert meta["max_batch_size"] == 1
    assert meta["signature"]["batchable"] is False
    assert set(meta["report"]["latency_ms"]) == {"1"}


def _rows_of_three(path: Path) -> Path:
    """A model that takes x [batch, length] only when length is a multiple of 3 (as
    real models take only some sizes), so kiln's default length of 64 is rejected."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["grouped"]),
            helper.make_node("ReduceSum", ["grouped", "axes"], ["y"], keepdims=0),
        ],
        "rows_of_three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, -1]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_fp32_is_served_when_the_model_rejects_synthetic_inputs(tmp_path: Path) -> None:
    model = _rows_of_three(tmp_path / "rows.onnx")
    meta = build(EngineStore(tmp_path / "store"), model)

    assert meta["precision"] == "fp32"
    skipped = meta["report"]["skipped"]
    assert set(skipped) == {"profile", "warmup"}
    assert "rejected kiln's synthetic inputs" in skipped["profile"] and "`shapes`" in skipped["profile"]
    assert meta["report"]["latency_ms"] == {}
    assert meta["report"]["shapes"]["x"]["source"] == "default"


def test_reduced_precision_asks_for_shapes_or_data_then_uses_the_shapes(tmp_path: Path) -> None:
    from engines.errors import CalibrationError
    from engines.types import Precision, ShapeRange

    model = _rows_of_three(tmp_path / "rows.onnx")
    store = EngineStore(tmp_path / "store")
    with pytest.raises(
        CalibrationError, match=r"rejects kiln's synthetic ones .*`shapes` option.*'validation'"
    ):
        build(store, model, BuildOptions(precision=Precision.FP16, max_batch_size=8))

    shapes = (ShapeRange("x", (1, 30), (1, 63), (1, 99)),)
    meta = build(store, model, BuildOptions(precision=Precision.FP16, max_batch_size=8, shapes=shapes))
    assert meta["precision"] == "fp16"
    assert meta["report"]["shapes"]["x"] == {
        "min": [1, 30],
        "opt": [4, 63],
        "max": [8, 99],
        "source": "shapes option",
    }
    assert meta["report"]["skipped"] == {}
    assert set(meta["report"]["latency_ms"]) == {"1", "8"}


def test_an_already_quantized_model_is_served_as_uploaded(
    model_files: dict[str, Path], tmp_path: Path
) -> None:
    from engines.precision import quantize_int8
    from engines.types import CalibrationMethod, Precision

    quantized = tmp_path / "mlp.int8.onnx"
    samples = {"x": np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)}
    quantize_int8(model_files["mlp"], quantized, samples, method=CalibrationMethod.MINMAX)
    store = EngineStore(tmp_path / "store")

    meta = build(
        store, quantized, BuildOptions(precision=Precision.INT8, max_batch_size=8, synthetic_calibration=True)
    )

    assert "already quantized (DequantizeLinear, QuantizeLinear)" in meta["report"]["note"]
    assert "served as uploaded" in meta["report"]["note"]
    assert [c["precision"] for c in meta["report"]["candidates"]] == ["fp32"]
