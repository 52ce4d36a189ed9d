"""Models and a reference runner for the precision, calibration and accuracy tests.

Everything here is built by the test suite itself (no model hub): a small MLP trained
on scikit-learn's bundled digits, and small CNNs with random weights built with
``onnx.helper``. The API tests reuse these builders, so they take a directory to
write (and cache) into and return plain paths and arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.backends.base import Runner
from engines.types import DYNAMIC, Signature, TensorSpec

DIGITS_INPUT = "pixels"
DIGITS_OUTPUT = "probs"
CNN_INPUT = "image"
CNN_OUTPUT = "logits"


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split used by ``train_digits_classifier``: x_train, x_test, y_train, y_test.

    Pixels are scaled to [0, 1] as float32; the split is fixed (75/25, seed 0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_test, y_train, y_test


def train_digits_classifier(directory: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train a 64-64-10 MLP on the digits and export it as ONNX; return (path, x_train, x_test).

    The graph is Gemm → Relu → Gemm → Softmax with input ``pixels`` float32 [batch, 64]
    and output ``probs`` float32 [batch, 10], batch dynamic, opset 17. Gemm weights are
    stored [out, in] with transB=1 so per-channel quantization works along axis 0.
    The model is cached in ``directory`` (trained once per directory, about a second).
    """
    path = directory / "digits_mlp.onnx"
    x_train, x_test, y_train, _ = digits_data()
    if path.exists():
        return path, x_train, x_test

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    (w1, w2), (b1, b2) = classifier.coefs_, classifier.intercepts_
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", [DIGITS_INPUT, "w1", "b1"], ["hidden"], transB=1),
            helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
            helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["scores"], transB=1),
            helper.make_node("Softmax", ["scores"], [DIGITS_OUTPUT], axis=1),
        ],
        "digits_mlp",
        [helper.make_tensor_value_info(DIGITS_INPUT, TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info(DIGITS_OUTPUT, TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            numpy_helper.from_array(w1.T.astype(np.float32), "w1"),
            numpy_helper.from_array(b1.astype(np.float32), "b1"),
            numpy_helper.from_array(w2.T.astype(np.float32), "w2"),
            numpy_helper.from_array(b2.astype(np.float32), "b2"),
        ],
    )
    _save(graph, path, opset=17)
    return path, x_train, x_test


def small_cnn(
    path: Path,
    *,
    opset: int = 17,
    batch: int | None = None,
    channels: tuple[int, int] = (8, 16),
    image_size: int = 8,
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """A Conv → Relu → MaxPool → Conv → Relu → Flatten → Gemm classifier with random weights.

    Input ``image`` float32 [batch, 1, image_size, image_size]; output ``logits``
    float32 [batch, num_classes]. ``batch=None`` makes the batch dim dynamic; an int fixes
    it (``batch=1`` is the fixed-batch model). Works at opset 11 and later.
    """
    rng = np.random.default_rng(seed)
    c1, c2 = channels
    pooled = image_size // 2

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return numpy_helper.from_array(values.astype(np.float32), name)

    def bias(name: str, size: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(size) * 0.1).astype(np.float32), name)

    batch_dim: int | str = "batch" if batch is None else batch
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [CNN_INPUT, "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("Flatten", ["r2"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [CNN_OUTPUT], transB=1),
        ],
        "small_cnn",
        [helper.make_tensor_value_info(CNN_INPUT, TensorProto.FLOAT, [batch_dim, 1, image_size, image_size])],
        [helper.make_tensor_value_info(CNN_OUTPUT, TensorProto.FLOAT, [batch_dim, num_classes])],
        initializer=[
            weight("conv1_w", c1, 1, 3, 3),
            bias("conv1_b", c1),
            weight("conv2_w", c2, c1, 3, 3),
            bias("conv2_b", c2),
            weight("fc_w", num_classes, c2 * pooled * pooled),
            bias("fc_b", num_classes),
        ],
    )
    _save(graph, path, opset=opset)
    return path


def _save(graph: onnx.GraphProto, path: Path, *, opset: int) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # An IR version every supported onnxruntime reads, whatever onnx.helper defaults to.
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def signature_of(path: Path) -> Signature:
    """The model's signature, read the way the service reads it: -1 for dynamic dims.

    ``batchable`` when every input and output has a dynamic first dimension.
    """
    graph = onnx.load(path, load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = tuple(dim.dim_value if dim.HasField("dim_value") else DYNAMIC for dim in tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        return TensorSpec(value.name, dtype, dims)

    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in graph.output)
    batchable = all(s.rank >= 1 and s.shape[0] == DYNAMIC for s in inputs + outputs)
    reason = "" if batchable else "not every input and output has a dynamic first dimension"
    return Signature(inputs, outputs, batchable, reason)


class OrtRunner(Runner):
    """A plain ONNX Runtime runner on the CPU, as a reference in tests (one thread)."""

    def __init__(self, path: Path, *, max_batch_size: int = 64) -> None:
        import onnxruntime as ort

        super().__init__(signature_of(path), max_batch_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._output_names = [output.name for output in self._session.get_outputs()]

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, (np.asarray(r) for r in results), strict=True))


def quantization_nodes(path: Path) -> Sequence[onnx.NodeProto]:
    """The QuantizeLinear and DequantizeLinear nodes of a saved model."""
    graph = onnx.load(path).graph
    return [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
