"""How each model output is judged against FP32: by what the output means.

An output of class scores is judged by top-1 agreement over its class axis; any
other float output by cosine similarity and error bounds; an integer or bool output
by exact match. ``rules_for`` decides per output, from the graph and the signature,
in this order (the first that applies wins):

1. the upload's ``metrics`` override for that output (``parse_metrics``);
2. integer or bool outputs: ``exact``;
3. float outputs computed by a softmax (a Softmax or LogSoftmax node, or the
   Exp / ReduceSum / Div pattern some exporters write, the sum reshaped or
   broadcast back, through Identity and Cast):
   ``top1`` over the softmax's axis;
4. names that say the output is not class scores (``embed``, ``hidden``, ``feature``,
   ``pool``, ``box``, ``coord``, ``state``...): ``cosine``;
5. names that say class scores (``logit``, ``score``, ``prob``, ``class``, ``cls``)
   on a known layout: ``[N, C]`` and ``[N, C, H, W]`` over axis 1, ``[N, T, C]`` over
   axis 2, when the class axis has a fixed size above 1;
6. a ``[N, C]`` output of a batchable model with a fixed C above 1 (a classifier's
   head): ``top1`` over axis 1;
7. anything else (a detector's anchors, boxes, embeddings, feature maps,
   regressions): ``cosine``.

A rule reads ``top1:axis=1``, ``cosine`` or ``exact`` (``describe``); the reason it
was chosen goes in the report beside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from engines.types import DYNAMIC, Signature, TensorSpec

TOP1, COSINE, EXACT = "top1", "cosine", "exact"
KINDS = (TOP1, COSINE, EXACT)

DECIDING_METRIC = {TOP1: "top1_agreement", COSINE: "cosine_similarity", EXACT: "exact_match"}
"""The metric whose threshold decides for an output judged by each kind of rule."""

CLASS_WORDS = ("logit", "score", "prob", "class", "cls")
NOT_CLASS_WORDS = (
    "embed",
    "hidden",
    "feature",
    "pool",
    "box",
    "coord",
    "landmark",
    "keypoint",
    "depth",
    "regress",
    "offset",
    "delta",
    "state",
    "vector",
)

_THROUGH = ("Identity", "Cast")
"""Ops between a softmax and the graph output that keep its axes."""

_BROADCAST = ("Reshape", "Expand", "Unsqueeze", "Identity")
"""Ops between a softmax's sum and its division that only bring the sum back to shape."""


@dataclass(frozen=True)
class OutputRule:
    kind: str
    axis: int | None = None
    """The class axis of a ``top1`` rule, non-negative."""
    reason: str = ""

    def describe(self) -> str:
        return f"{TOP1}:axis={self.axis}" if self.kind == TOP1 else self.kind

    @property
    def metric(self) -> str:
        return DECIDING_METRIC[self.kind]


def parse_metrics(text: str | None) -> dict[str, str]:
    """The upload's ``metrics`` field: a JSON object of output name to rule, e.g.
    ``{"logits": "top1:axis=1", "boxes": "cosine"}``. Returns the rules normalised
    (``top1:axis=K``, ``cosine``, ``exact``); raises ``ValueError`` with a message for
    the user on bad JSON or a rule it cannot read. Output names are checked against
    the model by ``check_metrics``."""
    if text is None or not text.strip():
        return {}
    example = '{"logits": "top1:axis=1", "boxes": "cosine"}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"metrics is not valid JSON ({exc.msg}); expected e.g. {example}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"metrics must be a JSON object of output name to rule, e.g. {example}")
    return {str(name): _normalise(name, value) for name, value in data.items()}


def _normalise(name: str, value: object) -> str:
    wanted = "one of 'top1:axis=K' (K the class axis), 'cosine', 'exact'"
    if not isinstance(value, str):
        raise ValueError(f"metrics '{name}' must be a string, {wanted}; got {json.dumps(value)}")
    text = value.strip().lower().replace(" ", "")
    if text in (COSINE, EXACT):
        return text
    match = re.fullmatch(r"top1:axis=(-?\d+)", text)
    if match is None:
        raise ValueError(f"metrics '{name}': cannot read {value!r}; use {wanted}")
    return f"{TOP1}:axis={int(match.group(1))}"


def check_metrics(metrics: Mapping[str, str], signature: Signature) -> None:
    """Refuse overrides naming an output the model does not have, a class axis outside
    the output's rank, or top-1 on an integer output (``ValueError``)."""
    outputs = {spec.name: spec for spec in signature.outputs}
    for name, rule in metrics.items():
        spec = outputs.get(name)
        if spec is None:
            known = ", ".join(repr(n) for n in outputs)
            raise ValueError(
                f"metrics names output '{name}', which the model does not have; its outputs: {known}"
            )
        if rule.startswith(TOP1):
            axis = int(rule.split("=")[1])
            if not -spec.rank <= axis < spec.rank or spec.rank < 1:
                raise ValueError(f"metrics '{name}': axis {axis} is outside the output's rank {spec.rank}")
            if not _floating(spec):
                raise ValueError(f"metrics '{name}': top-1 needs a float output, '{name}' is {spec.dtype}")


def rules_for(
    signature: Signature, model: onnx.ModelProto | None = None, overrides: Mapping[str, str] | None = None
) -> dict[str, OutputRule]:
    """Each output's rule (module doc). Without ``model``, the graph steps (the softmax)
    are skipped and names and layouts decide."""
    graph = _Graph(model)
    overrides = overrides or {}
    return {
        spec.name: _rule(spec, signature.batchable, overrides.get(spec.name), graph)
        for spec in signature.outputs
    }


class _Graph:
    """What the rules read of a model: producers, constant axes, the opset."""

    def __init__(self, model: onnx.ModelProto | None) -> None:
        self.producers = {out: node for node in model.graph.node for out in node.output} if model else {}
        self.initializers = {init.name: init for init in model.graph.initializer} if model else {}
        self.opset = _opset(model) if model is not None else 17


def _rule(
    spec: TensorSpec,
    batchable: bool,
    override: str | None,
    graph: _Graph,
) -> OutputRule:
    if override is not None:
        if override.startswith(TOP1):
            axis = int(override.split("=")[1])
            return OutputRule(TOP1, axis % max(spec.rank, 1), "the upload's metrics")
        return OutputRule(override, None, "the upload's metrics")
    if not _floating(spec):
        return OutputRule(EXACT, None, f"{spec.dtype} output")
    softmax_axis = _softmax_axis(spec, graph)
    if softmax_axis is not None:
        return OutputRule(TOP1, softmax_axis, f"a softmax over axis {softmax_axis}")
    name = spec.name.lower()
    if word := next((w for w in NOT_CLASS_WORDS if w in name), None):
        return OutputRule(COSINE, None, f"its name says '{word}', not class scores")
    layout_axis = {2: 1, 3: 2, 4: 1}.get(spec.rank)
    if (
        layout_axis is not None
        and (word := next((w for w in CLASS_WORDS if w in name), None))
        and spec.shape[layout_axis] not in (DYNAMIC, 1)
    ):
        layout = {2: "[N, C]", 3: "[N, T, C]", 4: "[N, C, H, W]"}[spec.rank]
        return OutputRule(TOP1, layout_axis, f"its name says '{word}' and its layout is {layout}")
    if spec.rank == 2 and batchable and spec.shape[1] not in (DYNAMIC, 1):
        return OutputRule(TOP1, 1, "a [N, C] output with a fixed C (a classifier's scores)")
    return OutputRule(COSINE, None, "no known class axis")


def _softmax_axis(spec: TensorSpec, graph: _Graph) -> int | None:
    producers, opset = graph.producers, graph.opset
    node = producers.get(spec.name)
    for _ in range(4):
        if node is None or node.op_type not in _THROUGH:
            break
        node = producers.get(node.input[0])
    if node is None or spec.rank < 1:
        return None
    if node.op_type in ("Softmax", "LogSoftmax"):
        default = -1 if opset >= 13 else 1
        axis = _int_attribute(node, "axis", default) % spec.rank
        # Before opset 13 a softmax flattens the axes from ``axis`` on: one class axis
        # only when it is the last.
        return axis if opset >= 13 or axis == spec.rank - 1 else None
    if node.op_type == "Div" and len(node.input) == 2:
        numerator, denominator = producers.get(node.input[0]), producers.get(node.input[1])
        # The sum may be reshaped and broadcast back before the division (jax2tf, tf2onnx).
        for _ in range(3):
            if denominator is None or denominator.op_type not in _BROADCAST:
                break
            denominator = producers.get(denominator.input[0])
        if (
            numerator is not None
            and numerator.op_type == "Exp"
            and denominator is not None
            and denominator.op_type == "ReduceSum"
            and denominator.input[0] == node.input[0]
        ):
            axes = _reduce_axes(denominator, graph)
            if axes is not None and len(axes) == 1:
                return axes[0] % spec.rank
    return None


def _reduce_axes(node: onnx.NodeProto, graph: _Graph) -> list[int] | None:
    from onnx import numpy_helper

    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) < 2 or not node.input[1]:
        return None
    name = node.input[1]
    if name in graph.initializers:
        return [int(v) for v in numpy_helper.to_array(graph.initializers[name]).ravel()]
    constant = graph.producers.get(name)
    if constant is not None and constant.op_type == "Constant":
        for attribute in constant.attribute:
            if attribute.name == "value":
                return [int(v) for v in numpy_helper.to_array(attribute.t).ravel()]
    return None


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _floating(spec: TensorSpec) -> bool:
    return spec.dtype.startswith(("float", "bfloat"))


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
