"""Models for the INT8 benchmarks, built with onnx.helper (random weights, no model hub).

``conv_net`` is a small VGG-style image model: big enough that the convolutions, not
the per-call overhead, dominate its latency, so INT8 kernels have something to win.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONV_NET_INPUT = "image"
CONV_NET_OUTPUT = "logits"


def conv_net(
    path: Path,
    *,
    image_size: int = 64,
    channels: tuple[int, ...] = (64, 64, 128, 128),
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """Write a conv classifier to ``path`` and return it.

    Input ``image`` float32 [batch, 3, image_size, image_size], batch dynamic; output
    ``logits`` float32 [batch, num_classes]. Layers: 3x3 Conv + Relu per entry of
    ``channels``, a 2x2 MaxPool after every second conv, then GlobalAveragePool,
    Flatten and Gemm. He-initialised random weights keep activations in a sane range.
    About 0.5 GMAC per image at the defaults. Opset 17.
    """
    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    current, in_channels = CONV_NET_INPUT, 3
    for index, out_channels in enumerate(channels):
        weight, bias = f"conv{index}_w", f"conv{index}_b"
        fan_in = in_channels * 9
        initializers += [
            numpy_helper.from_array(
                (rng.standard_normal((out_channels, in_channels, 3, 3)) * np.sqrt(2 / fan_in)).astype(
                    np.float32
                ),
                weight,
            ),
            numpy_helper.from_array((rng.standard_normal(out_channels) * 0.05).astype(np.float32), bias),
        ]
        nodes += [
            helper.make_node("Conv", [current, weight, bias], [f"conv{index}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]),
        ]
        current, in_channels = f"relu{index}", out_channels
        if index % 2 == 1:
            nodes.append(
                helper.make_node("MaxPool", [current], [f"pool{index}"], kernel_shape=[2, 2], strides=[2, 2])
            )
            current = f"pool{index}"
    initializers += [
        numpy_helper.from_array(
            (rng.standard_normal((num_classes, in_channels)) * np.sqrt(1 / in_channels)).astype(np.float32),
            "fc_w",
        ),
        numpy_helper.from_array(np.zeros(num_classes, dtype=np.float32), "fc_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [CONV_NET_OUTPUT], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [
            helper.make_tensor_value_info(
                CONV_NET_INPUT, TensorProto.FLOAT, ["batch", 3, image_size, image_size]
            )
        ],
        [helper.make_tensor_value_info(CONV_NET_OUTPUT, TensorProto.FLOAT, ["batch", num_classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
