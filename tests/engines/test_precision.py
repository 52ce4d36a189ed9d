"""FP16 conversion and INT8 Q/DQ insertion on small models built by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.errors import BuildFailed, CalibrationError, UnsupportedModel
from engines.precision import convert_fp16, quantize_int8
from engines.types import CalibrationMethod
from tests.precision_models import CNN_INPUT, OrtRunner, quantization_nodes, small_cnn


def image_samples(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {CNN_INPUT: rng.standard_normal((count, 1, 8, 8)).astype(np.float32)}


def initializers(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(path).graph
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def producers(path: Path) -> dict[str, onnx.NodeProto]:
    return {output: node for node in onnx.load(path).graph.node for output in node.output}


def opset_of(path: Path) -> int:
    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    return small_cnn(tmp_path / "cnn.onnx")


def test_int8_cnn_has_trt_compatible_qdq(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "cnn.int8.onnx"

    report = quantize_int8(cnn, output, image_samples(40), method=CalibrationMethod.MINMAX)

    values = initializers(output)
    nodes = quantization_nodes(output)
    assert nodes, "no Q/DQ nodes were inserted"
    # Every zero point is an int8 zero: symmetric, as TensorRT requires.
    for node in nodes:
        zero_point = values[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    # Conv and Gemm weights are int8 initializers dequantized per output channel (axis 0).
    made_by = producers(output)
    graph = onnx.load(output).graph
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.op_type for n in weighted] == ["Conv", "Conv", "Gemm"]
    for node in weighted:
        dequantize = made_by[node.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        weights = values[dequantize.input[0]]
        scales = values[dequantize.input[1]]
        assert weights.dtype == np.int8
        axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1)
        assert axis == 0
        assert scales.shape == (weights.shape[0],)
        # Biases stay float32 initializers, not int32 behind a DequantizeLinear.
        assert node.input[2] in values and values[node.input[2]].dtype == np.float32
    # Activations are quantized per tensor.
    for node in nodes:
        if node.op_type == "QuantizeLinear":
            assert values[node.input[1]].shape == ()

    assert report["method"] == "minmax"
    assert report["samples"] == 40
    assert report["opset_before"] == report["opset_after"] == 17
    assert report["per_channel_weights"] == 3
    assert {"Conv", "Gemm"} <= set(report["quantized_op_types"])
    assert report["size_after_bytes"] < report["size_before_bytes"]
    assert leftovers(output.parent, {output.name}) == []

    runner = OrtRunner(output)
    result = runner.infer(image_samples(4, seed=1))
    assert result["logits"].shape == (4, 10)


def test_opset_11_model_is_upgraded_for_per_channel(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn11.onnx", opset=11)
    output = tmp_path / "cnn11.int8.onnx"

    report = quantize_int8(model, output, image_samples(20), method=CalibrationMethod.MINMAX)

    assert report["opset_before"] == 11
    assert report["opset_after"] >= 13
    assert opset_of(output) >= 13
    onnx.checker.check_model(onnx.load(output))
    assert OrtRunner(output).infer(image_samples(2))["logits"].shape == (2, 10)


def test_per_tensor_weights_when_per_channel_is_off(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "cnn.int8.onnx"

    report = quantize_int8(cnn, output, image_samples(20), method=CalibrationMethod.MINMAX, per_channel=False)

    values = initializers(output)
    assert report["per_channel_weights"] == 0
    assert all(values[node.input[1]].shape == () for node in quantization_nodes(output))


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_every_calibration_method_quantizes(cnn: Path, tmp_path: Path, method: CalibrationMethod) -> None:
    output = tmp_path / f"cnn.{method}.onnx"

    # 70 samples: more than one calibration pass, the last one partial.
    report = quantize_int8(cnn, output, image_samples(70), method=method)

    assert report["method"] == str(method)
    reference = OrtRunner(cnn).infer(image_samples(8, seed=5))["logits"]
    quantized = OrtRunner(output).infer(image_samples(8, seed=5))["logits"]
    cosine = np.sum(reference * quantized) / np.linalg.norm(reference) / np.linalg.norm(quantized)
    assert cosine > 0.99


def test_fixed_batch_model_is_calibrated_one_sample_at_a_time(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn_b1.onnx", batch=1)
    output = tmp_path / "cnn_b1.int8.onnx"

    report = quantize_int8(model, output, image_samples(10), method=CalibrationMethod.ENTROPY)

    assert report["calibration_batch_size"] == 1
    assert OrtRunner(output).infer(image_samples(1))["logits"].shape == (1, 10)


def test_samples_that_do_not_match_the_inputs_are_refused(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "cnn.int8.onnx"

    with pytest.raises(CalibrationError, match=r"missing \['image'\], unknown \['pixels'\]"):
        quantize_int8(cnn, output, {"pixels": np.zeros((4, 64), np.float32)}, method=CalibrationMethod.MINMAX)
    assert not output.exists()


def test_calibration_failure_leaves_no_output(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "cnn.int8.onnx"
    wrong_shape = {CNN_INPUT: np.zeros((4, 3, 8, 8), np.float32)}

    with pytest.raises(BuildFailed, match=r"^int8: calibration failed"):
        quantize_int8(cnn, output, wrong_shape, method=CalibrationMethod.MINMAX)
    assert leftovers(output.parent, set()) == []


def test_unreadable_model_fails_the_build(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07not a model")

    with pytest.raises(BuildFailed, match=r"^int8: cannot read the model broken\.onnx"):
        quantize_int8(broken, tmp_path / "x.onnx", image_samples(2), method=CalibrationMethod.MINMAX)
    with pytest.raises(BuildFailed, match=r"^fp16: cannot read the model broken\.onnx"):
        convert_fp16(broken, tmp_path / "y.onnx")
    assert leftovers(tmp_path, {"broken.onnx"}) == []


def test_model_with_nothing_to_quantize_is_unsupported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Exp", ["x"], ["y"])],
        "exp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "exp.onnx"
    onnx.save(model, path)
    output = tmp_path / "exp.int8.onnx"

    with pytest.raises(
        UnsupportedModel,
        match=r"nothing to quantize: the model has no Conv, ConvTranspose, Gemm, MatMul with float weights",
    ):
        quantize_int8(path, output, {"x": np.ones((3, 4), np.float32)}, method=CalibrationMethod.MINMAX)
    assert not output.exists()


def test_fp16_keeps_float32_io_and_halves_the_weights(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "cnn.fp16.onnx"

    report = convert_fp16(cnn, output)

    model = onnx.load(output)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {init.data_type for init in model.graph.initializer} == {TensorProto.FLOAT16}
    assert len(model.graph.value_info) == 0
    assert report["cast_nodes_added"] == 2
    assert report["size_after_bytes"] < 0.6 * report["size_before_bytes"]
    assert leftovers(output.parent, {output.name}) == []

    samples = image_samples(3)
    expected = OrtRunner(cnn).infer(samples)["logits"]
    got = OrtRunner(output).infer(samples)["logits"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)


def test_fp16_reports_block_listed_ops_kept_in_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"], name="project"),
            helper.make_node("TopK", ["scores", "k"], ["values", "indices"], name="top2", axis=1),
        ],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", 2]),
        ],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "k"),
        ],
        # A stale float32 annotation the conversion must not leave behind.
        value_info=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "topk.onnx"
    onnx.save(model, path)

    report = convert_fp16(path, tmp_path / "topk.fp16.onnx")

    assert report["fp32_op_types"] == ["TopK"]
    assert report["fp32_nodes"] == ["top2"]
    # The output made by a block-listed op keeps its float32 type.
    result = OrtRunner(tmp_path / "topk.fp16.onnx").infer(
        {"x": rng.standard_normal((3, 6)).astype(np.float32)}
    )
    assert result["values"].dtype == np.float32 and result["indices"].dtype == np.int64


def test_fp16_sorts_an_unsorted_graph(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["h"], ["y"], name="second"),
            helper.make_node("Neg", ["x"], ["h"], name="first"),
        ],
        "unsorted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, path)
    output = tmp_path / "unsorted.fp16.onnx"

    convert_fp16(path, output)

    onnx.checker.check_model(onnx.load(output))
    result = OrtRunner(output).infer({"x": np.array([[1, -2, 3, -4]], np.float32)})
    np.testing.assert_array_equal(result["y"], [[0, 2, 0, 4]])


def test_asymmetric_activations_for_onnx_runtime_only(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "cnn.int8-ort.onnx"

    report = quantize_int8(
        cnn, output, image_samples(40), method=CalibrationMethod.MINMAX, symmetric_activations=False
    )

    values = initializers(output)
    weight_zero_points, activation_zero_points = [], []
    for node in quantization_nodes(output):
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in values
        bucket = weight_zero_points if is_weight else activation_zero_points
        bucket.append(values[node.input[2]])
    assert weight_zero_points and not any(zp.any() for zp in weight_zero_points)
    assert any(zp.any() for zp in activation_zero_points)
    assert report["symmetric_activations"] is False
    samples = image_samples(4, seed=2)
    expected = OrtRunner(cnn).infer(samples)["logits"]
    got = OrtRunner(output).infer(samples)["logits"]
    cosine = np.sum(expected * got) / np.linalg.norm(expected) / np.linalg.norm(got)
    assert cosine > 0.99


def test_onnx_runtime_recipe_quantizes_weighted_outputs_in_uint8(cnn: Path, tmp_path: Path) -> None:
    output = tmp_path / "cnn.int8-ort.onnx"
    quantize_int8(
        cnn, output, image_samples(40), method=CalibrationMethod.MINMAX, symmetric_activations=False
    )

    values = initializers(output)
    activation_types = {
        values[node.input[2]].dtype for node in quantization_nodes(output) if node.op_type == "QuantizeLinear"
    }
    assert activation_types == {np.dtype(np.uint8)}
    # Each Conv's output is quantized, so ONNX Runtime fuses DQ-Conv-Q into QLinearConv.
    made_by = producers(output)
    quantized_outputs = {
        made_by[n.input[0]].op_type for n in quantization_nodes(output) if n.input[0] in made_by
    }
    assert "Conv" in quantized_outputs


def test_nodes_named_to_keep_stay_float(cnn: Path, tmp_path: Path) -> None:
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(onnx.load(cnn).graph.node)]
    first_conv = names[0]
    report = convert_fp16(cnn, tmp_path / "cnn.fp16.onnx", keep_fp32={first_conv})
    assert first_conv in report["fp32_nodes"]
    conv = next(n for n in onnx.load(tmp_path / "cnn.fp16.onnx").graph.node if n.name == first_conv)
    weight = initializers(tmp_path / "cnn.fp16.onnx")[conv.input[1]]
    assert weight.dtype == np.float32

    output = tmp_path / "cnn.int8.onnx"
    report = quantize_int8(
        cnn, output, image_samples(20), method=CalibrationMethod.ENTROPY, exclude_nodes={first_conv}
    )
    assert report["excluded_nodes"] == [first_conv]
    node = next(n for n in onnx.load(output).graph.node if n.name == first_conv)
    made_by = producers(output)
    assert all(
        made_by.get(name) is None or made_by[name].op_type != "DequantizeLinear" for name in node.input
    )
    assert report["quantized_op_types"].get("Conv") == 1


# -- FP16 through control flow -------------------------------------------------------------


def _control_flow_model() -> onnx.ModelProto:
    """NonMaxSuppression inside an If's else branch on boxes computed in that branch (as
    torchvision's batched_nms exports), and a TopK inside a Loop body on a loop-carried
    value: both block-listed, both reading values that exist only in their body."""
    const = numpy_helper.from_array
    else_branch = helper.make_graph(
        [
            helper.make_node("Add", ["boxes", "half"], ["shifted"]),
            helper.make_node("Unsqueeze", ["shifted", "zero"], ["boxes3"]),
            helper.make_node("Unsqueeze", ["scores", "zero01"], ["scores3"]),
            helper.make_node("NonMaxSuppression", ["boxes3", "scores3", "most", "iou"], ["selected"]),
            helper.make_node("Gather", ["selected", "two"], ["keep"], axis=1),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("keep", TensorProto.INT64, ["k"])],
        [
            const(np.array([0.5], np.float32), "half"),
            const(np.array([0], np.int64), "zero"),
            const(np.array([0, 1], np.int64), "zero01"),
            const(np.array([10], np.int64), "most"),
            const(np.array([0.5], np.float32), "iou"),
            const(np.array(2, np.int64), "two"),
        ],
    )
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["none"], value=const(np.zeros(0, np.int64)))],
        "then",
        [],
        [helper.make_tensor_value_info("none", TensorProto.INT64, ["k"])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["carried", "scale"], ["grown"]),
            helper.make_node("TopK", ["grown", "one"], ["best", "where"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, ["n"]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("grown", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("best", TensorProto.FLOAT, [1]),
        ],
        [const(np.array([1.5], np.float32), "scale"), const(np.array([1], np.int64), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Size", ["boxes"], ["size"]),
            helper.make_node("Equal", ["size", "zero_size"], ["empty"]),
            helper.make_node("If", ["empty"], ["kept"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Gather", ["boxes", "kept"], ["kept_boxes"], axis=0),
            helper.make_node("Loop", ["trips", "", "scores"], ["final", "bests"], body=body),
        ],
        "control_flow",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"]),
        ],
        [
            helper.make_tensor_value_info("kept_boxes", TensorProto.FLOAT, ["k", 4]),
            helper.make_tensor_value_info("bests", TensorProto.FLOAT, ["t", 1]),
        ],
        [const(np.array(0, np.int64), "zero_size"), const(np.array(3, np.int64), "trips")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_keeps_block_listed_ops_inside_if_and_loop_bodies_in_float32(tmp_path: Path) -> None:
    source = tmp_path / "control_flow.onnx"
    onnx.save(_control_flow_model(), source)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    feeds = {"boxes": boxes, "scores": np.array([0.9, 0.8, 0.7], np.float32)}

    report = convert_fp16(source, tmp_path / "fp16.onnx", feeds=feeds)

    assert "NonMaxSuppression in If 'If_2'" in report["fp32_subgraph_nodes"]
    assert "TopK in Loop 'Loop_4'" in report["fp32_subgraph_nodes"]
    assert report["casts_moved_into_subgraphs"] >= 2
    converted = onnx.load(tmp_path / "fp16.onnx")
    onnx.checker.check_model(converted, full_check=True)
    want = OrtRunner(source)._session.run(None, feeds)
    got = OrtRunner(tmp_path / "fp16.onnx")._session.run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])  # the same boxes survive NMS
    np.testing.assert_allclose(got[1], want[1], rtol=1e-3)


# -- dynamic INT8 -------------------------------------------------------------------------


def test_dynamic_int8_quantizes_matmul_weights_and_keeps_the_model_right(tmp_path: Path) -> None:
    from engines.precision import quantize_int8_dynamic
    from tests import repair_models

    model = repair_models.fp16_overflow_mlp(tmp_path)  # MatMul layers, trained on the digits
    x_test = repair_models.digits_split()[1][:64]
    feeds = {repair_models.INPUT: x_test}
    report = quantize_int8_dynamic(model, tmp_path / "dynamic.onnx", feeds={repair_models.INPUT: x_test[:1]})
    assert report["mode"] == "dynamic" and report["quantized_op_types"].get("MatMulInteger", 0) >= 1
    ops = {node.op_type for node in onnx.load(tmp_path / "dynamic.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops  # activations quantized per run, no calibration
    want = OrtRunner(model)._session.run(None, feeds)[0]
    got = OrtRunner(tmp_path / "dynamic.onnx")._session.run(None, feeds)[0]
    assert float(np.mean(got == want)) >= 0.98  # the labels


def test_dynamic_int8_refuses_a_model_without_matmul_weights(tmp_path: Path) -> None:
    from engines.precision import quantize_int8_dynamic

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")
    with pytest.raises(UnsupportedModel, match="nothing to quantize"):
        quantize_int8_dynamic(tmp_path / "conv.onnx", tmp_path / "dynamic.onnx")
    assert not (tmp_path / "dynamic.onnx").exists()
