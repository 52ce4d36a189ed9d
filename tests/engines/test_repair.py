"""Precision repair on models built to fail FP16 and INT8 (tests/repair_models.py):
rejected with numbers without repair, served with the offending nodes kept in FP32
with it, within the node and time budgets, and on both backends."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from engines import accuracy
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.backends.tensorrt import split_artifact
from engines.build import BuildJob, run_build
from engines.calibration import load_samples
from engines.errors import AccuracyRejected
from engines.precision import convert_fp16
from engines.repair import default_node_budget
from engines.store import EngineStore
from engines.types import BuildOptions, Precision, Signature, engine_cache_key
from tests import repair_models
from tests.fakes.install import TENSORRT_11, install_fake_gpu
from tests.fakes.tensorrt import PLAN_MAGIC, plan_header
from tests.zoo.harness import npz_bytes, put_bytes

BATCH_SIZES = (1, 8)
OVERFLOW_LAYER = {"MatMul1", "Add1", "Relu1", "MatMul2"}
"""The layer whose activations leave float16's range, and the MatMul that scales them back."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("repair-models")
    return {
        "fp16": repair_models.fp16_overflow_mlp(directory),
        "int8": repair_models.int8_outlier_mlp(directory),
    }


def build(
    root: Path,
    model: Path,
    backend: str = "onnxruntime",
    data: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Build ``model`` with calibration and validation ``data`` (default: the digits)."""
    store = EngineStore(root)
    if data is None:
        calibration, validation = repair_models.digits_split()
        data = {repair_models.INPUT: calibration}, {repair_models.INPUT: validation}
    options = BuildOptions(
        max_batch_size=max(BATCH_SIZES),
        calibration_sha256=put_bytes(store, npz_bytes(data[0])),
        validation_sha256=put_bytes(store, npz_bytes(data[1])),
        **fields,
    )
    model_sha = put_bytes(store, model.read_bytes(), model=True)
    if backend == "onnxruntime":
        device = OnnxRuntimeBackend().device_signature()
    else:
        from engines.backends.tensorrt import TensorRTBackend

        device = TensorRTBackend().device_signature()
    key = engine_cache_key(model_sha, options, device)
    return run_build(BuildJob(str(root), model_sha, options.to_dict(), backend, key, BATCH_SIZES))


def served_outputs_match_fp32(root: Path, meta: dict[str, Any], model: Path) -> None:
    """The committed engine passes the gate again, on its own, at every batch size."""
    signature = Signature.from_dict(meta["signature"])
    options = BuildOptions(max_batch_size=max(BATCH_SIZES))
    backend = OnnxRuntimeBackend()
    path = root / "judge.npz"
    path.write_bytes(npz_bytes({repair_models.INPUT: repair_models.digits_split()[1]}))
    samples = load_samples(path, signature)
    reference = backend.load(model, signature, options)
    engine = backend.load(EngineStore(root).artifact_path(meta["cache_key"], meta), signature, options)
    try:
        comparison = accuracy.compare(reference, engine, samples, list(BATCH_SIZES))
    finally:
        reference.close()
        engine.close()
    tolerance = accuracy.parse_tolerance(None, Precision(meta["precision"]))
    assert accuracy.check(comparison, tolerance) == []


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_without_repair_the_candidate_is_rejected_with_its_numbers(
    precision: str, models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(AccuracyRejected) as caught:
        build(tmp_path, models[precision], precision=Precision(precision), repair=False)
    assert f"the {precision} engine is outside tolerance" in caught.value.message
    assert "top1_agreement" in caught.value.message
    details = caught.value.details
    assert details["accuracy"]["batch_sizes"] == list(BATCH_SIZES)
    assert "repair" not in details


def test_fp16_repair_keeps_the_overflowing_layer_in_fp32(models: dict[str, Path], tmp_path: Path) -> None:
    meta = build(tmp_path, models["fp16"], precision=Precision.FP16)
    report = meta["report"]
    repair = report["repair"]
    assert meta["precision"] == "fp16" and repair["passed"]
    # The numbers it failed with first, at every served batch size.
    first = repair["failed_at_first"]
    assert first["violations"] and first["accuracy"]["batch_sizes"] == list(BATCH_SIZES)
    # The converter keeps the weights beyond 65504 (MatMul1, Add1) in FP32 by itself; the
    # repair keeps the rest of the layer whose activations overflow.
    kept = {node["name"]: node for node in repair["kept_fp32"]}
    assert kept and set(kept) <= OVERFLOW_LAYER
    assert "Relu1" in kept and kept["Relu1"]["op_type"] == "Relu"
    assert all(node["reason"].startswith("overflow:") for node in kept.values())
    assert len(kept) <= repair["node_budget"] == default_node_budget(4)
    # The served graph keeps exactly those nodes (and the converter's own list) in FP32.
    assert set(report["transform"]["fp32_nodes"]) >= OVERFLOW_LAYER
    assert accuracy.check(report["accuracy"], report["tolerance"]) == []
    assert set(repair["latency_ms"]) == {"unrepaired", "repaired", "fp32"}
    assert repair["latency_vs_fp32"] > 0 and repair["latency_vs_unrepaired"] > 0
    assert repair["seconds"] > 0
    served_outputs_match_fp32(tmp_path, meta, models["fp16"])


def test_int8_repair_tries_calibration_methods_then_excludes_the_outlier_layer(
    models: dict[str, Path], tmp_path: Path
) -> None:
    meta = build(tmp_path, models["int8"], precision=Precision.INT8)
    repair = meta["report"]["repair"]
    assert meta["precision"] == "int8" and repair["passed"]
    tried = [entry["method"] for entry in repair["calibration_methods"]]
    assert tried == ["minmax", "percentile", "entropy"]
    assert not any(entry["passed"] for entry in repair["calibration_methods"])
    assert repair["calibration_method"] in tried
    kept = [node["name"] for node in repair["kept_fp32"]]
    # Only the layers on either side of the outlier channels, named as the quantizer
    # names them after fusing MatMul+Add (MatMul2 reads the outliers).
    assert 1 <= len(kept) <= repair["node_budget"]
    assert any(name.startswith(repair_models.THIRD_LAYER_MATMUL) for name in kept), kept
    assert set(meta["report"]["transform"]["excluded_nodes"]) == set(kept)
    assert meta["report"]["transform"]["method"] == repair["calibration_method"]
    # Every method's ranges and every round came from one pass over the samples.
    calibration = meta["report"]["calibration"]
    assert calibration["passes"] == 1
    assert calibration["methods_derived"] == ["entropy", "minmax", "percentile"]
    assert {"pre_process", "collect", "ranges_minmax"} <= set(calibration["timings_s"])
    served_outputs_match_fp32(tmp_path, meta, models["int8"])


def test_auto_treats_repaired_candidates_like_any_other(models: dict[str, Path], tmp_path: Path) -> None:
    meta = build(tmp_path, models["fp16"], precision=Precision.AUTO)
    report = meta["report"]
    candidates = {c["precision"]: c for c in report["candidates"]}
    assert candidates["fp16"]["accepted"] and candidates["fp16"]["repaired"]
    assert set(candidates["fp16"]["kept_fp32"]) <= OVERFLOW_LAYER

    def cost(candidate: dict[str, Any]) -> float:
        fp32 = candidates["fp32"]["latency_ms"]
        ratios = [candidate["latency_ms"][b] / fp32[b] for b in fp32]
        return float(np.exp(np.mean(np.log(ratios))))

    fastest = min((c for c in candidates.values() if c["accepted"]), key=cost)
    assert meta["precision"] == fastest["precision"], report["choice"]
    if meta["precision"] == "fp16":
        assert report["repair"]["passed"]


def test_node_budget_stops_the_repair_and_says_so(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AccuracyRejected) as caught:
        build(tmp_path, models["fp16"], precision=Precision.FP16, repair_max_nodes=1)
    repair = caught.value.details["repair"]
    assert not repair["passed"] and repair["node_budget"] == 1
    assert "the node budget is spent: 0 of 1 nodes kept" in repair["stopped"]


def test_time_budget_stops_the_repair_and_says_so(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AccuracyRejected) as caught:
        build(tmp_path, models["fp16"], precision=Precision.FP16, repair_seconds=1e-6)
    repair = caught.value.details["repair"]
    assert not repair["passed"] and repair["kept_fp32"] == []
    assert "time budget of 1e-06 s ran out" in repair["stopped"]


def test_kept_neighbours_exchange_float32_without_a_float16_round_trip(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "kept.onnx"
    convert_fp16(models["fp16"], out, keep_fp32=OVERFLOW_LAYER)
    graph = onnx.load(out).graph
    producer = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.name in OVERFLOW_LAYER - {"MatMul1"}:
            feeding = producer[node.input[0]]
            assert feeding.name in OVERFLOW_LAYER, (node.name, feeding.name, feeding.op_type)


def test_tensorrt_receives_the_repaired_onnx_with_kept_nodes_in_fp32(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contract: the strongly typed network is parsed from the repaired graph, in which
    the kept nodes read and write float32 and the rest float16."""
    gpu = install_fake_gpu(monkeypatch, tensorrt_version=TENSORRT_11)
    meta = build(tmp_path, models["fp16"], backend="tensorrt", precision=Precision.FP16)
    assert gpu.violations() == []
    repair = meta["report"]["repair"]
    assert repair["passed"] and {node["name"] for node in repair["kept_fp32"]} <= OVERFLOW_LAYER
    assert set(meta["report"]["transform"]["fp32_nodes"]) >= OVERFLOW_LAYER
    # The fake's plan records the network's flags and carries the ONNX it was parsed from.
    artifact = EngineStore(tmp_path).artifact_path(meta["cache_key"], meta).read_bytes()
    plan = bytes(split_artifact(artifact)[1])
    strongly_typed = 1 << int(gpu.trt.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert plan_header(plan)["network_flags"] & strongly_typed
    (length,) = struct.unpack_from("<I", plan, len(PLAN_MAGIC))
    served = onnx.load_model_from_string(plan[len(PLAN_MAGIC) + 4 + length :])
    parsed = onnx.shape_inference.infer_shapes(served)
    types = {value.name: value.type.tensor_type.elem_type for value in parsed.graph.value_info}
    initializers = {init.name: init.data_type for init in parsed.graph.initializer}
    types.update(initializers)
    for node in parsed.graph.node:
        if node.op_type == "MatMul":
            weight_type = types[node.input[1]]
            if node.name in OVERFLOW_LAYER:
                assert weight_type == onnx.TensorProto.FLOAT, node.name
                assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
            else:
                assert weight_type == onnx.TensorProto.FLOAT16, node.name


def test_a_failing_measurement_ends_the_repair_with_its_reason(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxruntime.quantization import qdq_loss_debug

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no memory for the intermediate tensors")

    monkeypatch.setattr(qdq_loss_debug, "collect_activations", broken)
    with pytest.raises(AccuracyRejected) as caught:
        build(tmp_path, models["fp16"], precision=Precision.FP16)
    stopped = caught.value.details["repair"]["stopped"]
    assert stopped.startswith("the repair failed: measuring the intermediate tensors")
    assert "no memory for the intermediate tensors" in stopped


@pytest.mark.slow
def test_a_zoo_model_that_fails_int8_is_repaired(tmp_path: Path) -> None:
    """PP-OCR's recognizer (paddle2onnx) fails INT8 with min-max calibration on the
    zoo's text-page inputs; repair makes it pass (docs/BENCHMARKS.md: percentile)."""
    from tests.zoo.harness import data_for
    from tests.zoo.models import BY_NAME

    zoo = BY_NAME["pp-ocr-rec"]
    model = zoo.make(tmp_path / "zoo")
    with pytest.raises(AccuracyRejected):
        build(tmp_path / "plain", model, data=data_for(zoo), precision=Precision.INT8, repair=False)
    meta = build(tmp_path / "repaired", model, data=data_for(zoo), precision=Precision.INT8)
    repair = meta["report"]["repair"]
    assert meta["precision"] == "int8" and repair["passed"]
    assert repair["calibration_method"] != "minmax" or repair["kept_fp32"]
    assert len(repair["kept_fp32"]) <= repair["node_budget"]
    assert accuracy.check(meta["report"]["accuracy"], meta["report"]["tolerance"]) == []


def test_float16_round_trips_of_non_float32_values_stay(tmp_path: Path) -> None:
    """An int64 length cast to float for a Range (kept float32 by the converter) must
    not be rewired to the int64 value when the round trip through float16 is dropped."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Gather", ["shape", "one"], ["length"], name="length", axis=0),
            helper.make_node("Cast", ["length"], ["length_f"], name="to_float", to=TensorProto.FLOAT),
            helper.make_node("Range", ["zero", "length_f", "step"], ["positions"], name="range"),
            helper.make_node("Mul", ["x", "positions"], ["y"], name="scale"),
        ],
        "range_of_length",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "step"),
        ],
    )
    source = tmp_path / "range.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    x = np.ones((2, 4), dtype=np.float32)
    convert_fp16(source, tmp_path / "range16.onnx", feeds={"x": x})  # loads and runs, or raises
