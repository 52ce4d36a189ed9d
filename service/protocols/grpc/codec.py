"""KServe v2 gRPC tensors in and out: ``raw_input_contents`` and typed contents
to numpy feeds, and outputs to ``raw_output_contents``, as Triton does.

Pure functions over the generated messages. Every malformed request raises
``BadRequest`` (INVALID_ARGUMENT) naming what is wrong; datatypes and binary
layout rules are those of the REST codec (``kserve_codec``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engines.types import Signature
from service.errors import BadRequest
from service.protocols.grpc.stubs import messages
from service.protocols.kserve_codec import (
    OutputChoice,
    binary_tensor,
    check_datatype,
    check_shape,
    datatype_of,
    little_endian_contiguous,
)
from service.protocols.native_codec import cast_checked

# The typed-contents field that carries each datatype (FP16 travels only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def decode_inputs(
    request: messages.ModelInferRequest, signature: Signature, max_elements: int
) -> dict[str, np.ndarray]:
    """Feeds of the engine's dtypes from a ModelInferRequest. Either every input
    comes in ``raw_input_contents`` (in the order of ``inputs``), or none does."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send raw contents for every input or for none"
        )
    if not request.inputs:
        raise BadRequest("the request has no inputs")
    specs = {spec.name: spec for spec in signature.inputs}
    feeds: dict[str, np.ndarray] = {}
    total_elements = 0
    for position, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise BadRequest(f"unknown input '{tensor.name}'; this model takes {', '.join(specs)}")
        if tensor.name in feeds:
            raise BadRequest(f"input '{tensor.name}' is given twice")
        if "shared_memory_region" in tensor.parameters:
            raise BadRequest("shared-memory inputs are not supported; send the data in the request")
        dtype = check_datatype(tensor.datatype, spec)
        shape = check_shape(list(tensor.shape), tensor.name)
        total_elements += math.prod(shape)
        if total_elements > max_elements:
            raise BadRequest(
                f"input '{tensor.name}' brings the request to {total_elements} elements; "
                f"the limit is {max_elements}"
            )
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input '{tensor.name}' has both contents and raw_input_contents")
            feeds[tensor.name] = binary_tensor(memoryview(raw[position]), tensor.name, dtype, shape)
        else:
            feeds[tensor.name] = _typed_tensor(tensor, dtype, shape)
    return feeds


def _typed_tensor(tensor: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    datatype = tensor.datatype
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input '{tensor.name}' is {datatype}: send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise BadRequest(
            f"input '{tensor.name}' has {len(values)} values in {field}; shape {list(shape)} needs {expected}"
        )
    wide: np.ndarray = np.array(values, dtype=_WIDE[field]).reshape(shape)
    return cast_checked(wide, dtype.newbyteorder("="), tensor.name)


# The numpy dtype each contents field holds before narrowing to the input's own.
_WIDE = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


def output_choices(request: messages.ModelInferRequest, signature: Signature) -> tuple[OutputChoice, ...]:
    """The outputs to return in order: the requested ones, or all of them."""
    known = [spec.name for spec in signature.outputs]
    if not request.outputs:
        return tuple(OutputChoice(name, binary=True) for name in known)
    choices: list[OutputChoice] = []
    for output in request.outputs:
        if output.name not in known:
            raise BadRequest(f"unknown output '{output.name}'; this model returns {', '.join(known)}")
        if any(choice.name == output.name for choice in choices):
            raise BadRequest(f"output '{output.name}' is requested twice")
        if "classification" in output.parameters:
            raise BadRequest("the classification extension is not supported")
        if "shared_memory_region" in output.parameters:
            raise BadRequest("shared-memory outputs are not supported")
        choices.append(OutputChoice(output.name, binary=True))
    return tuple(choices)


def timeout_ms(request: messages.ModelInferRequest) -> float | None:
    """Triton's ``timeout`` parameter (µs); 0 or absent means the engine's own limit."""
    parameter = request.parameters.get("timeout")
    if parameter is None:
        return None
    if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 0:
        raise BadRequest("parameter 'timeout' must be a non-negative int64 of microseconds")
    return parameter.int64_param / 1000.0 if parameter.int64_param else None


def priority(request: messages.ModelInferRequest) -> int | None:
    """Triton's ``priority`` parameter (tritonclient sends a uint64; an int64 is
    taken too); 0 or absent means the engine's default level."""
    parameter = request.parameters.get("priority")
    if parameter is None:
        return None
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("uint64_param", "int64_param") or getattr(parameter, choice) < 0:
        raise BadRequest("parameter 'priority' must be a non-negative integer (1 is the highest)")
    return int(getattr(parameter, choice))


def check_parameters(request: messages.ModelInferRequest) -> None:
    sequence = request.parameters.get("sequence_id")
    if sequence is not None and (sequence.int64_param or sequence.string_param):
        raise BadRequest("sequence requests are not supported: kiln engines keep no state")


def encode_response(
    outputs: dict[str, np.ndarray],
    choices: tuple[OutputChoice, ...],
    *,
    model_name: str,
    model_version: str,
    request_id: str,
) -> messages.ModelInferResponse:
    """A ModelInferResponse with every output in ``raw_output_contents``
    (little-endian, row-major), as Triton answers."""
    response = messages.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for choice in choices:
        array = outputs[choice.name]
        response.outputs.add(name=choice.name, datatype=datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(little_endian_contiguous(array).tobytes())
    return response
