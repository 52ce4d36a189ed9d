"""Write examples/mlp.onnx: a small MLP classifier (x[batch, 16] -> probs[batch, 4]).

Used by the README walkthrough: `make example` (or `python examples/make_example.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_mlp(path: Path, in_features: int = 16, hidden: int = 64, classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((hidden, in_features)).astype(np.float32) * 0.25,
        "b1": np.zeros(hidden, np.float32),
        "w2": rng.standard_normal((classes, hidden)).astype(np.float32) * 0.25,
        "b2": np.zeros(classes, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu1"),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"], name="fc2", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("mlp.onnx")
    print(make_mlp(target))
