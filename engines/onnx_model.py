"""Loading an uploaded ONNX model safely and reading its signature.

``load_model`` is the gate every upload passes before anything builds on it:
size limit, protobuf decode, no external data (an upload is one file, so any
external reference would point outside it), opset range, and ``onnx.checker``
with full shape inference. ``read_signature`` turns the graph's inputs and outputs
into ``TensorSpec`` values and decides whether requests can be batched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from engines.errors import InvalidModel, UnsupportedModel
from engines.types import DYNAMIC, Signature, TensorSpec

MIN_OPSET = 7
"""The oldest default-domain opset ONNX Runtime still loads."""

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3 - 1
"""protobuf cannot parse a message of 2 GiB or more."""


def max_supported_opset() -> int:
    """The newest default-domain opset the installed onnx package knows."""
    return int(onnx.defs.onnx_opset_version())


def load_model(path: Path, *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> onnx.ModelProto:
    """Parse and check an ONNX file. Raises ``InvalidModel`` or ``UnsupportedModel``."""
    size = path.stat().st_size
    if size == 0:
        raise InvalidModel("the model file is empty")
    if size > max_bytes:
        raise InvalidModel(f"the model is {size} bytes; the limit is {max_bytes} bytes")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidModel(f"the file is not an ONNX model: {_short(exc)}") from exc
    if not model.graph.node and not model.graph.output:
        raise InvalidModel("the file is not an ONNX model: it holds no graph")
    _refuse_external_data(model)
    _check_opset(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModel(f"the ONNX checker rejected the model: {_short(exc)}") from exc
    except (ValueError, RuntimeError) as exc:
        raise InvalidModel(f"the ONNX checker rejected the model: {_short(exc)}") from exc
    return model


def _short(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _tensors_with_data(model: onnx.ModelProto) -> list[TensorProto]:
    tensors: list[TensorProto] = []

    def visit(graph: onnx.GraphProto) -> None:
        tensors.extend(graph.initializer)
        tensors.extend(sparse.values for sparse in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return tensors


def _refuse_external_data(model: onnx.ModelProto) -> None:
    for tensor in _tensors_with_data(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise InvalidModel(
                f"tensor '{tensor.name}' keeps its data in an external file '{location}'; "
                "upload one self-contained .onnx file (onnx.save_model(..., "
                "save_as_external_data=False))"
            )


def _check_opset(model: onnx.ModelProto) -> None:
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise InvalidModel("the model imports no default-domain (ai.onnx) opset")
    version = default[0]
    newest = max_supported_opset()
    if version < MIN_OPSET or version > newest:
        raise UnsupportedModel(
            f"the model uses opset {version}; kiln supports opsets {MIN_OPSET} to {newest}"
        )


def _dtype_name(elem_type: int, tensor_name: str) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedModel(
            f"tensor '{tensor_name}' has element type {elem_type}, which kiln cannot serve"
        ) from exc


def _spec(value: onnx.ValueInfoProto) -> tuple[TensorSpec, list[str | None]]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise UnsupportedModel(
            f"'{value.name}' is a {kind or 'untyped value'}; kiln serves tensor inputs and outputs only"
        )
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type == TensorProto.STRING:
        raise UnsupportedModel(f"'{value.name}' is a string tensor, which kiln does not serve")
    dims: list[int] = []
    names: list[str | None] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(dim.dim_value)
                names.append(None)
            else:
                dims.append(DYNAMIC)
                names.append(dim.dim_param or None)
    else:
        raise UnsupportedModel(f"'{value.name}' has no declared shape (not even its rank)")
    return TensorSpec(value.name, _dtype_name(tensor_type.elem_type, value.name), tuple(dims)), names


def read_signature(model: onnx.ModelProto) -> Signature:
    """Inputs (initializers excluded), outputs, and whether axis 0 is a shared batch axis."""
    initializer_names = {init.name for init in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializer_names]
    if not graph_inputs:
        raise UnsupportedModel("the model has no inputs")
    if not model.graph.output:
        raise UnsupportedModel("the model has no outputs")
    inputs = [_spec(v) for v in graph_inputs]
    outputs = [_spec(v) for v in model.graph.output]
    batchable, reason = _batch_axis(inputs, outputs)
    return Signature(
        inputs=tuple(spec for spec, _ in inputs),
        outputs=tuple(spec for spec, _ in outputs),
        batchable=batchable,
        unbatched_reason=reason,
    )


def _batch_axis(
    inputs: list[tuple[TensorSpec, list[str | None]]],
    outputs: list[tuple[TensorSpec, list[str | None]]],
) -> tuple[bool, str]:
    """Batchable only when every input and output has a dynamic first dimension,
    and those dimensions are not named differently (a symbolic name like "N" on the
    inputs and "N*2" on an output means axis 0 is not the same batch)."""
    first_names: set[str] = set()
    for spec, names in inputs + outputs:
        if spec.rank == 0:
            return False, f"'{spec.name}' is a scalar, so there is no batch axis"
        if spec.shape[0] != DYNAMIC:
            return False, (
                f"'{spec.name}' has a fixed first dimension of {spec.shape[0]}; "
                "requests are served one at a time"
            )
        if names[0] is not None:
            first_names.add(names[0])
    if len(first_names) > 1:
        return False, (
            "the first dimensions have different symbolic names "
            f"({', '.join(sorted(first_names))}), so axis 0 is not one shared batch axis"
        )
    return True, ""
