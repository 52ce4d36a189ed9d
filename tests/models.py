"""Tiny ONNX models the test suite builds itself (no model hub is reachable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path, opset: int = OPSET) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def mlp(path: Path, in_features: int = 16, hidden: int = 32, out_features: int = 4, seed: int = 0) -> Path:
    """x[batch, in] -> Gemm -> Relu -> Gemm -> y[batch, out]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[
            _init("w1", rng.standard_normal((hidden, in_features)).astype(np.float32) * 0.3),
            _init("b1", rng.standard_normal(hidden).astype(np.float32) * 0.1),
            _init("w2", rng.standard_normal((out_features, hidden)).astype(np.float32) * 0.3),
            _init("b2", rng.standard_normal(out_features).astype(np.float32) * 0.1),
        ],
    )
    return _save(graph, path)


def cnn(path: Path, channels: int = 8, size: int = 16, classes: int = 10, seed: int = 1) -> Path:
    """image[batch, 3, size, size] -> Conv -> Relu -> MaxPool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    flat = channels * (size // 2) * (size // 2)
    nodes = [
        helper.make_node("Conv", ["image", "cw", "cb"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu1"),
        helper.make_node("MaxPool", ["cr"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            _init("cw", rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.2),
            _init("cb", rng.standard_normal(channels).astype(np.float32) * 0.1),
            _init("fw", rng.standard_normal((classes, flat)).astype(np.float32) * 0.05),
            _init("fb", rng.standard_normal(classes).astype(np.float32) * 0.1),
        ],
    )
    return _save(graph, path)


def two_in_two_out(path: Path) -> Path:
    """a[batch, 4], b[batch, 4] -> sum = a + b, prod = a * b (both [batch, 4])."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
        helper.make_node("Mul", ["a", "b"], ["prod"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_in_two_out",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    return _save(graph, path)


def int64_embedding(path: Path, vocab: int = 50, dim: int = 8, seed: int = 2) -> Path:
    """ids[batch, 5] (int64) -> Gather from a table -> ReduceMean over tokens -> [batch, dim]."""
    rng = np.random.default_rng(seed)
    axes = _init("axes", np.array([1], dtype=np.int64))
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather", axis=0),
        helper.make_node("ReduceMean", ["emb", "axes"], ["pooled"], name="mean", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "int64_embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", dim])],
        initializer=[_init("table", rng.standard_normal((vocab, dim)).astype(np.float32)), axes],
    )
    return _save(graph, path, opset=18)


def fixed_batch_one(path: Path, seed: int = 3) -> Path:
    """x[1, 6] -> MatMul -> Sigmoid -> y[1, 3]: a model exported with a fixed batch of 1."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("Sigmoid", ["m"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_batch_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[_init("w", rng.standard_normal((6, 3)).astype(np.float32))],
    )
    return _save(graph, path)


def reference_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What plain ONNX Runtime computes on the original model (the ground truth)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
