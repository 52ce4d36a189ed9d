"""Pure helpers of the TensorRT backend: profile shapes, fusion report, artifact header."""

from __future__ import annotations

import json

import pytest

from engines.backends.tensorrt import (
    ARTIFACT_MAGIC,
    fusion_report,
    optimization_profile,
    pack_artifact_header,
    split_artifact,
)
from engines.errors import BuildFailed, StoreCorrupted
from engines.types import BuildOptions, ShapeRange, Signature, TensorSpec

IMAGE = Signature(
    (TensorSpec("image", "float32", (-1, 3, -1, -1)),),
    (TensorSpec("logits", "float32", (-1, 10)),),
    batchable=True,
)
UNBATCHED = Signature(
    (TensorSpec("sequence", "float32", (-1, 8)),),
    (TensorSpec("summary", "float32", (8,)),),
    batchable=False,
    unbatched_reason="the output has no batch dimension",
)


def test_batch_axis_from_limits_other_axes_from_shapes() -> None:
    options = BuildOptions(
        max_batch_size=16,
        opt_batch_size=4,
        shapes=(ShapeRange("image", (99, 3, 128, 128), (99, 3, 224, 224), (99, 3, 512, 384)),),
    )
    profile = optimization_profile([("image", (-1, 3, -1, -1))], IMAGE, options)
    assert profile == {"image": ((1, 3, 128, 128), (4, 3, 224, 224), (16, 3, 512, 384))}


def test_static_inputs_need_no_profile() -> None:
    signature = Signature((TensorSpec("x", "float32", (1, 6)),), (TensorSpec("y", "float32", (1, 3)),), False)
    assert optimization_profile([("x", (1, 6))], signature, BuildOptions()) == {}


def test_an_unbatched_models_dynamic_first_axis_needs_a_range() -> None:
    with pytest.raises(BuildFailed, match=r"input 'sequence' \(shape \[-1, 8\]\) has dynamic dimension 0"):
        optimization_profile([("sequence", (-1, 8))], UNBATCHED, BuildOptions())
    options = BuildOptions(shapes=(ShapeRange("sequence", (1, 8), (32, 8), (128, 8)),))
    profile = optimization_profile([("sequence", (-1, 8))], UNBATCHED, options)
    assert profile == {"sequence": ((1, 8), (32, 8), (128, 8))}


def test_the_missing_range_message_shows_an_example() -> None:
    with pytest.raises(BuildFailed) as caught:
        optimization_profile([("image", (-1, 3, -1, -1))], IMAGE, BuildOptions())
    message = caught.value.message
    assert "dynamic dimension 2" in message
    assert 'shapes={"image": {"min": [1, 3, 1, 1], "opt": [...], "max": [...]}}' in message


def test_a_range_of_the_wrong_rank() -> None:
    options = BuildOptions(shapes=(ShapeRange("image", (1, 3, 8), (1, 3, 8), (1, 3, 8)),))
    with pytest.raises(BuildFailed, match="min \\[1, 3, 8\\] has rank 3, the input has rank 4"):
        optimization_profile([("image", (-1, 3, -1, -1))], IMAGE, options)


def test_a_fixed_batch_in_a_batchable_signature_is_refused() -> None:
    with pytest.raises(BuildFailed, match="fixed batch dimension"):
        optimization_profile([("image", (4, 3, -1, -1))], IMAGE, BuildOptions())


TENSORRT_10_JSON = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to /conv1/Conv + /relu1/Relu",
            "LayerType": "Reformat",
            "Metadata": "",
        },
        {
            "Name": "/conv1/Conv + /relu1/Relu",
            "LayerType": "CaskConvolution",
            "Metadata": "[ONNX Layer: /conv1/Conv]\x1f[ONNX Layer: /relu1/Relu]",
        },
        {"Name": "/pool1/MaxPool", "LayerType": "CaskPooling", "Metadata": "[ONNX Layer: /pool1/MaxPool]"},
        {
            "Name": "{ForeignNode[/flatten/Flatten.../fc/Gemm]}",
            "LayerType": "Myelin",
            "Metadata": "[ONNX Layer: /flatten/Flatten]\x1f[ONNX Layer: /fc/Gemm]",
        },
    ],
    "Bindings": ["image", "logits"],
}


def test_fusion_report_for_tensorrt_10() -> None:
    report = fusion_report(json.dumps(TENSORRT_10_JSON), network_layers=5, engine_layers=4)
    assert report["network_layers"] == 5
    assert report["engine_layers"] == 4
    assert report["reformat_layers"] == 1
    assert report["inspector_layout"] == "Bindings"
    assert report["io_tensors"] == ["image", "logits"]
    assert [layer["nodes"] for layer in report["fused_layers"]] == [
        ["/conv1/Conv", "/relu1/Relu"],
        ["/flatten/Flatten", "/fc/Gemm"],
    ]


def test_fusion_report_for_tensorrt_11() -> None:
    info = {
        "Layers": TENSORRT_10_JSON["Layers"],
        "I/O Tensors": [
            {"Name": "image", "IOMode": "Input", "DataType": "Float", "Dimensions": [-1, 3, 16, 16]},
            {"Name": "logits", "IOMode": "Output", "DataType": "Float", "Dimensions": [-1, 10]},
        ],
    }
    report = fusion_report(info, network_layers=5)
    assert report["inspector_layout"] == "I/O Tensors"
    assert report["io_tensors"] == ["image", "logits"]
    assert report["engine_layers"] == 4
    assert report["fused_layer_count"] == 2


def test_fusion_report_with_layer_names_only() -> None:
    report = fusion_report({"Layers": ["fc1 + relu1", "fc2"], "Bindings": ["x", "y"]}, network_layers=3)
    assert report["fused_layers"] == [{"name": "fc1 + relu1", "layer_type": "", "nodes": ["fc1", "relu1"]}]


def test_artifact_header_round_trip() -> None:
    header = pack_artifact_header({"device_signature": {"backend": "tensorrt"}, "format": 1})
    metadata, plan = split_artifact(header + b"PLANBYTES")
    assert metadata == {"device_signature": {"backend": "tensorrt"}, "format": 1}
    assert bytes(plan) == b"PLANBYTES"


def test_a_bare_plan_has_no_metadata() -> None:
    metadata, plan = split_artifact(b"ftrt-like bytes")
    assert metadata is None
    assert bytes(plan) == b"ftrt-like bytes"


def test_a_damaged_header_is_store_corrupted() -> None:
    with pytest.raises(StoreCorrupted, match="not JSON"):
        split_artifact(ARTIFACT_MAGIC + (3).to_bytes(4, "little") + b"{{{plan")
    with pytest.raises(StoreCorrupted, match="not a JSON object"):
        split_artifact(ARTIFACT_MAGIC + (2).to_bytes(4, "little") + b"[]plan")
