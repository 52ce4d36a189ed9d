from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.errors import InvalidModel, UnsupportedModel
from engines.onnx_model import load_model, read_signature
from tests import models


def test_signature_of_a_batchable_mlp(model_files: dict[str, Path]) -> None:
    signature = read_signature(load_model(model_files["mlp"]))
    assert [(s.name, s.dtype, s.shape) for s in signature.inputs] == [("x", "float32", (-1, 16))]
    assert [(s.name, s.dtype, s.shape) for s in signature.outputs] == [("y", "float32", (-1, 4))]
    assert signature.batchable


def test_int64_inputs_keep_their_dtype(model_files: dict[str, Path]) -> None:
    signature = read_signature(load_model(model_files["int64_embedding"]))
    assert signature.inputs[0].dtype == "int64"
    assert signature.batchable


def test_fixed_batch_of_one_is_served_unbatched(model_files: dict[str, Path]) -> None:
    signature = read_signature(load_model(model_files["fixed_batch_one"]))
    assert not signature.batchable
    assert "fixed first dimension of 1" in signature.unbatched_reason


def test_differently_named_first_dims_are_not_one_batch_axis(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "a"], ["b"], axis=0)],
        "doubling",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", 3])],
    )
    path = tmp_path / "doubling.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    signature = read_signature(load_model(path))
    assert not signature.batchable
    assert "different symbolic names" in signature.unbatched_reason


def test_garbage_bytes_are_an_invalid_model(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf\xff\xff")
    with pytest.raises(InvalidModel, match=r"not an ONNX model|checker"):
        load_model(path)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(InvalidModel, match="empty"):
        load_model(path)


def test_size_limit(model_files: dict[str, Path]) -> None:
    with pytest.raises(InvalidModel, match="limit"):
        load_model(model_files["mlp"], max_bytes=100)


def test_checker_failure_names_the_problem(tmp_path: Path) -> None:
    # A node that reads a tensor nobody produces.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    path = tmp_path / "broken.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(InvalidModel, match="checker"):
        load_model(path)


def test_external_data_is_refused(tmp_path: Path) -> None:
    path = models.mlp(tmp_path / "mlp.onnx")
    model = onnx.load_model(path)
    onnx.save_model(
        model,
        tmp_path / "external.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    # Point the reference outside the upload, as a hostile file would.
    hostile = onnx.load_model(tmp_path / "external.onnx", load_external_data=False)
    for tensor in hostile.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    (tmp_path / "hostile.onnx").write_bytes(hostile.SerializeToString())
    for name in ("external.onnx", "hostile.onnx"):
        with pytest.raises(InvalidModel, match="external file"):
            load_model(tmp_path / name)


def test_opset_newer_than_supported_is_unsupported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "future",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 999)])
    path = tmp_path / "future.onnx"
    onnx.save_model(model, path)
    with pytest.raises(UnsupportedModel, match="opset 999"):
        load_model(path)


def test_initializers_are_not_inputs(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "with_initializer_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[weight],
    )
    path = tmp_path / "init.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    signature = read_signature(load_model(path))
    assert [s.name for s in signature.inputs] == ["x"]
