"""The TensorRT backend on a real GPU: build, load and infer, compared with ONNX Runtime.

Runs where TensorRT and an NVIDIA GPU exist; skips elsewhere with the reason.
Tolerances allow for TF32 math (on by default for FP32 engines) and FP16.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.backends.tensorrt import TensorRTBackend, split_artifact
from engines.errors import InvalidInput, UnsupportedModel
from engines.types import BuildOptions, ShapeRange, Signature, TensorSpec
from tests.models import reference_outputs

pytestmark = pytest.mark.gpu

MLP = Signature(
    (TensorSpec("x", "float32", (-1, 16)),), (TensorSpec("y", "float32", (-1, 4)),), batchable=True
)
CNN = Signature(
    (TensorSpec("image", "float32", (-1, 3, 16, 16)),),
    (TensorSpec("logits", "float32", (-1, 10)),),
    batchable=True,
)
TWO_IN_TWO_OUT = Signature(
    (TensorSpec("a", "float32", (-1, 4)), TensorSpec("b", "float32", (-1, 4))),
    (TensorSpec("sum", "float32", (-1, 4)), TensorSpec("prod", "float32", (-1, 4))),
    batchable=True,
)
FIXED = Signature(
    (TensorSpec("x", "float32", (1, 6)),), (TensorSpec("y", "float32", (1, 3)),), batchable=False
)
TOKENS = Signature(
    (TensorSpec("tokens", "float32", (-1, -1)),),
    (TensorSpec("scaled", "float32", (-1, -1)),),
    batchable=True,
)


def feeds_for(signature: Signature, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        spec.name: rng.standard_normal(tuple(batch if d == -1 else d for d in spec.shape)).astype(np.float32)
        for spec in signature.inputs
    }


def assert_close(
    model: Path, feeds: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: float
) -> None:
    want = reference_outputs(model, feeds)
    for name, array in want.items():
        assert got[name].shape == array.shape
        np.testing.assert_allclose(got[name], array, rtol=tolerance, atol=tolerance, err_msg=name)


def build_and_load(
    model: Path, signature: Signature, tmp_path: Path, options: BuildOptions, instances: int = 1
) -> tuple[Any, dict[str, Any]]:
    backend = TensorRTBackend()
    artifact = tmp_path / f"{model.stem}.plan"
    report = backend.build(model, signature, options, artifact, timing_cache_path=tmp_path / "timing.cache")
    return backend.load(artifact, signature, options, instances=instances), report


def test_probe_finds_tensorrt_and_the_gpu(tensorrt: Any) -> None:
    ok, reason = TensorRTBackend.probe()
    assert ok, reason
    assert reason.startswith("TensorRT ")


@pytest.mark.parametrize(
    ("model", "signature", "batches"),
    [
        ("mlp", MLP, (1, 3, 8)),
        ("cnn", CNN, (1, 8)),
        ("two_in_two_out", TWO_IN_TWO_OUT, (2, 8)),
        ("fixed_batch_one", FIXED, (1,)),
    ],
)
def test_fp32_engine_matches_onnx_runtime(
    tensorrt: Any,
    model_files: dict[str, Path],
    tmp_path: Path,
    model: str,
    signature: Signature,
    batches: tuple[int, ...],
) -> None:
    runner, report = build_and_load(
        model_files[model], signature, tmp_path, BuildOptions(max_batch_size=8), instances=2
    )
    try:
        rng = np.random.default_rng(0)
        for batch in batches:
            feeds = feeds_for(signature, batch, rng)
            assert_close(model_files[model], feeds, runner.infer(feeds), 1e-2)
    finally:
        runner.close()
    assert report["fusion"].get("engine_layers", 0) > 0, report["fusion"]
    assert report["timing_cache"]["written_bytes"] > 0
    assert json.loads(json.dumps(report))  # the report is JSON for the store


def test_fp16_engine_from_an_fp16_graph(tensorrt: Any, model_files: dict[str, Path], tmp_path: Path) -> None:
    from onnxconverter_common import float16

    path = tmp_path / "cnn_fp16.onnx"
    onnx.save_model(
        float16.convert_float_to_float16(onnx.load_model(str(model_files["cnn"])), keep_io_types=True),
        str(path),
    )
    runner, _ = build_and_load(path, CNN, tmp_path, BuildOptions(max_batch_size=4))
    try:
        feeds = feeds_for(CNN, 4, np.random.default_rng(1))
        got = runner.infer(feeds)
        assert got["logits"].dtype == np.float32
        assert_close(model_files["cnn"], feeds, got, 5e-2)
    finally:
        runner.close()


def test_int8_engine_from_a_qdq_graph(tensorrt: Any, model_files: dict[str, Path], tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(2)
    samples = [feeds_for(CNN, 1, rng) for _ in range(16)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._samples, None)

    path = tmp_path / "cnn_int8.onnx"
    quantize_static(
        str(model_files["cnn"]),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    runner, report = build_and_load(path, CNN, tmp_path, BuildOptions(max_batch_size=4))
    try:
        feeds = feeds_for(CNN, 4, rng)
        got = runner.infer(feeds)["logits"]
        want = reference_outputs(model_files["cnn"], feeds)["logits"]
        cosine = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cosine > 0.95, (cosine, report["build_log"])
    finally:
        runner.close()


def test_user_ranges_for_a_dynamic_sequence(tensorrt: Any, tmp_path: Path) -> None:
    from tests.engines.test_tensorrt_backend import tokens_model

    path = tokens_model(tmp_path / "tokens.onnx")
    options = BuildOptions(max_batch_size=4, shapes=(ShapeRange("tokens", (1, 1), (2, 16), (4, 64)),))
    runner, _ = build_and_load(path, TOKENS, tmp_path, options)
    try:
        for seq in (1, 17, 64):
            tokens = np.random.default_rng(seq).standard_normal((3, seq)).astype(np.float32)
            np.testing.assert_allclose(runner.infer({"tokens": tokens})["scaled"], tokens * 3, rtol=1e-6)
        with pytest.raises(InvalidInput, match="dimension 1"):
            runner.infer({"tokens": np.zeros((1, 65), dtype=np.float32)})
    finally:
        runner.close()


def test_concurrent_calls(tensorrt: Any, model_files: dict[str, Path], tmp_path: Path) -> None:
    runner, _ = build_and_load(
        model_files["two_in_two_out"], TWO_IN_TWO_OUT, tmp_path, BuildOptions(max_batch_size=8), instances=3
    )
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(50):
                feeds = feeds_for(TWO_IN_TWO_OUT, int(rng.integers(1, 9)), rng)
                got = runner.infer(feeds)
                np.testing.assert_allclose(got["sum"], feeds["a"] + feeds["b"], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got["prod"], feeds["a"] * feeds["b"], rtol=1e-5, atol=1e-6)
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    runner.close()
    assert errors == []


def test_the_artifact_records_this_device(
    tensorrt: Any, model_files: dict[str, Path], tmp_path: Path
) -> None:
    backend = TensorRTBackend()
    artifact = tmp_path / "mlp.plan"
    backend.build(model_files["mlp"], MLP, BuildOptions(), artifact)
    metadata, plan = split_artifact(artifact.read_bytes())
    assert metadata is not None
    assert metadata["device_signature"]["backend_version"] == tensorrt.__version__
    assert len(plan) > 0


def test_data_dependent_output_is_refused_at_build(tensorrt: Any, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["where"], name="nonzero")],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("where", TensorProto.INT64, [2, "count"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "nonzero.onnx"
    onnx.save_model(model, str(path))
    signature = Signature(
        (TensorSpec("x", "float32", (4, 4)),), (TensorSpec("where", "int64", (2, -1)),), batchable=False
    )
    with pytest.raises(UnsupportedModel, match="data-dependent"):
        TensorRTBackend().build(path, signature, BuildOptions(), tmp_path / "nonzero.plan")


# -- the audit's findings, on the real library (see tests/engines/test_tensorrt_audit.py) ---------


def test_a_dynamic_dim_with_minimum_above_one_builds_profiles_and_loads(
    tensorrt: Any, tmp_path: Path
) -> None:
    from engines.build import warm_up_engine
    from engines.store import EngineStore
    from tests.engines.test_tensorrt_audit import run_tensorrt_build
    from tests.engines.test_tensorrt_backend import tokens_model

    path = tokens_model(tmp_path / "tokens.onnx")
    options = BuildOptions(max_batch_size=8, shapes=(ShapeRange("tokens", (1, 8), (4, 64), (8, 128)),))
    store = EngineStore(tmp_path / "store")
    meta = run_tensorrt_build(store, path, options)
    runner = TensorRTBackend().load(store.artifact_path(meta["cache_key"], meta), TOKENS, options)
    try:
        assert warm_up_engine(runner, meta, {1, 8}) is None
    finally:
        runner.close()


def test_an_output_larger_than_at_the_profile_max_is_served(tensorrt: Any, tmp_path: Path) -> None:
    from tests.engines.test_tensorrt_audit import SLICED, SLICED_RANGES, sliced_model

    options = BuildOptions(shapes=SLICED_RANGES)
    runner, _ = build_and_load(sliced_model(tmp_path / "sliced.onnx"), SLICED, tmp_path, options)
    try:
        a = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
        got = runner.infer({"a": a, "b": np.zeros((8, 1), np.float32)})
        np.testing.assert_array_equal(got["y"], a[:, 1:])
    finally:
        runner.close()


def test_inputs_that_disagree_on_a_shared_dimension_are_bad_input(tensorrt: Any, tmp_path: Path) -> None:
    from tests.engines.test_tensorrt_audit import PAIRED, PAIRED_RANGES, paired_model

    options = BuildOptions(shapes=PAIRED_RANGES)
    runner, _ = build_and_load(paired_model(tmp_path / "paired.onnx"), PAIRED, tmp_path, options)
    try:
        with pytest.raises(InvalidInput, match="cannot run these input shapes together"):
            runner.infer({"ids": np.ones((2, 5), np.float32), "mask": np.ones((2, 7), np.float32)})
    finally:
        runner.close()
