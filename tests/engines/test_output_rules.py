"""Each output is judged by what it means: rules from the graph, the names and the
layout, and the upload's overrides."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.comparison import compare_output
from engines.onnx_model import read_signature
from engines.output_rules import OutputRule, check_metrics, parse_metrics, rules_for


def _model(nodes: list, outputs: list, initializers: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        outputs,
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _out(name: str, shape: list, dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_a_softmax_decides_the_class_axis_whatever_the_name() -> None:
    model = _model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Softmax", ["r"], ["s"], axis=1),
            helper.make_node("Identity", ["s"], ["y"]),
        ],
        [_out("y", ["batch", 3, 2])],
        (numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "shape"),),
    )
    rules = rules_for(read_signature(model), model)
    assert rules["y"].describe() == "top1:axis=1"
    assert "softmax" in rules["y"].reason


def test_a_softmax_written_as_exp_over_its_sum_is_found() -> None:
    model = _model(
        [
            helper.make_node("Exp", ["x"], ["e"]),
            helper.make_node("ReduceSum", ["e", "axes"], ["sum"], keepdims=1),
            helper.make_node("Div", ["e", "sum"], ["target"]),
        ],
        [_out("target", ["batch", 6])],
        (numpy_helper.from_array(np.array([-1], np.int64), "axes"),),
    )
    assert rules_for(read_signature(model), model)["target"].describe() == "top1:axis=1"


@pytest.mark.parametrize(
    ("name", "shape", "rule"),
    [
        ("logits", ["batch", "sequence", 100], "top1:axis=2"),  # a language model's next tokens
        ("logits", ["batch", 21, "height", "width"], "top1:axis=1"),  # a segmenter's pixels
        ("y", ["batch", 10], "top1:axis=1"),  # a classifier head
        ("last_hidden_state", ["batch", "sequence", 32], "cosine"),
        ("sentence_embedding", ["batch", 384], "cosine"),
        ("boxes", ["batch", 4], "cosine"),
        ("output0", ["batch", 22, "anchors"], "cosine"),  # a detector's raw head
        ("y", ["batch", "sequence", 4], "cosine"),  # no softmax, no class name
        ("mask", ["batch", 1, "height", "width"], "cosine"),
        ("label", ["batch"], "exact"),
    ],
)
def test_names_and_layouts_decide_without_a_softmax(name: str, shape: list, rule: str) -> None:
    dtype = TensorProto.INT64 if name == "label" else TensorProto.FLOAT
    model = _model([helper.make_node("Identity", ["x"], [name])], [_out(name, shape, dtype)])
    signature = read_signature(model)
    assert rules_for(signature, model)[name].describe() == rule


def test_an_override_wins_and_is_checked_against_the_model() -> None:
    model = _model([helper.make_node("Identity", ["x"], ["features"])], [_out("features", ["batch", 6])])
    signature = read_signature(model)
    overrides = parse_metrics('{"features": "top1: axis=-1"}')
    assert overrides == {"features": "top1:axis=-1"}
    check_metrics(overrides, signature)
    rule = rules_for(signature, model, overrides)["features"]
    assert rule == OutputRule("top1", 1, "the upload's metrics")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "must be a JSON object"),
        ('{"y": 3}', "must be a string"),
        ('{"y": "argmax"}', "cannot read 'argmax'"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_metrics_are_refused_with_what_to_send(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_metrics(text)


def test_overrides_naming_what_the_model_lacks_are_refused() -> None:
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [_out("y", ["batch", 6])])
    signature = read_signature(model)
    with pytest.raises(ValueError, match="does not have; its outputs: 'y'"):
        check_metrics({"logits": "cosine"}, signature)
    with pytest.raises(ValueError, match="outside the output's rank 2"):
        check_metrics({"y": "top1:axis=2"}, signature)


def test_compare_output_judges_one_run_by_its_rule() -> None:
    reference = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    candidate = np.array([[0.6, 0.4], [0.8, 0.2]], np.float32)
    metrics, broken = compare_output(
        reference, candidate, OutputRule("top1", 1), {"top1_agreement": 0.99, "cosine_similarity": 0.0}
    )
    assert metrics["top1_agreement"] == 0.5 and metrics["top1_flips"] == 1
    assert broken and broken[0].startswith("top1_agreement 0.5 < 0.99")
    metrics, broken = compare_output(reference, candidate, OutputRule("cosine"), {"top1_agreement": 0.99})
    assert "top1_agreement" not in metrics and broken == []


def test_a_softmax_whose_sum_is_reshaped_and_broadcast_back_is_found() -> None:
    """jax2tf through tf2onnx (magika) reduces with keepdims=0, then reshapes and
    expands the sum before dividing."""
    model = _model(
        [
            helper.make_node("Exp", ["x"], ["e"]),
            helper.make_node("ReduceSum", ["e", "axes"], ["sum"], keepdims=0),
            helper.make_node("Reshape", ["sum", "column"], ["sum2"]),
            helper.make_node("Shape", ["e"], ["shape"]),
            helper.make_node("Expand", ["sum2", "shape"], ["broadcast"]),
            helper.make_node("Div", ["e", "broadcast"], ["target_label"]),
        ],
        [_out("target_label", ["n", 6])],
        (
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "column"),
        ),
    )
    rule = rules_for(read_signature(model), model)["target_label"]
    assert rule.describe() == "top1:axis=1" and "softmax" in rule.reason
