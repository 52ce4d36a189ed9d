"""KServe v2 tensors in and out: JSON tensors and the binary tensor data extension.

Pure functions, no HTTP objects: the routes hand in the raw body and the values of
the ``Inference-Header-Content-Length`` and ``Content-Encoding`` headers, and get
back numpy feeds, or the response bytes and headers.

A request body is a JSON header, optionally followed by the raw bytes of the
inputs that carry ``parameters.binary_data_size``, in the order of ``inputs``
(little-endian, row-major, no padding; BOOL is one byte). The header's length is
given by ``Inference-Header-Content-Length``; without it the whole body is JSON.
``Content-Type`` is never read: tritonclient sends none.

Every malformed request raises ``BadRequest`` (400) naming what is wrong, and a
JSON value that does not fit the input's dtype raises ``InvalidInput`` (400);
nothing here raises anything that would answer 500.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engines.errors import UnsupportedModel
from engines.types import Signature, TensorSpec
from service.errors import BadRequest
from service.protocols.intake import check_json_shape, parse_priority
from service.protocols.native_codec import cast_checked
from service.protocols.offload import inflate
from service.protocols.responses import dumps

# KServe v2 datatype names and their little-endian numpy dtypes. BYTES (strings)
# and BF16 have no kiln engine to feed and are refused by name.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_BY_NUMPY: dict[np.dtype | str, str] = {
    dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()
}
_DATATYPE_BY_NUMPY.update({str(dtype): name for dtype, name in list(_DATATYPE_BY_NUMPY.items())})

INFERENCE_HEADER = "Inference-Header-Content-Length"


def datatype_of(dtype: np.dtype | str) -> str:
    """The v2 datatype name ("FP32") of a numpy dtype; ``UnsupportedModel`` if none."""
    found = _DATATYPE_BY_NUMPY.get(dtype)  # native dtypes and their names
    if found is not None:
        return found
    found = _DATATYPE_BY_NUMPY.get(np.dtype(dtype).newbyteorder("="))
    if found is None:
        raise UnsupportedModel(f"dtype {np.dtype(dtype)} has no KServe v2 datatype")
    return found


def config_type_of(dtype: np.dtype | str) -> str:
    """The Triton model-configuration type ("TYPE_FP32") of a numpy dtype."""
    return "TYPE_" + datatype_of(dtype)


@dataclass(frozen=True)
class OutputChoice:
    """One output to return, and whether its data goes in the binary section."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: what the route needs to run it and answer it.

    ``request_id`` is None when the client sent no ``id``; ``timeout_ms`` is None
    when it sent no (or a zero) ``parameters.timeout``; ``priority`` is None when
    it sent no ``parameters.priority``."""

    feeds: dict[str, np.ndarray]
    outputs: tuple[OutputChoice, ...]
    request_id: str | None
    timeout_ms: float | None
    priority: int | None = None


@dataclass(frozen=True)
class InferHeader:
    """The JSON header of an infer request, parsed, with the binary section after it
    (``payload`` is None for a raw binary body: ``Inference-Header-Content-Length: 0``)."""

    payload: dict[str, Any] | None
    binary: memoryview
    timeout_ms: float | None
    priority: int | None


# -- request body -------------------------------------------------------------


def content_encoding(encoding: str | None) -> str | None:
    """``gzip`` or ``deflate`` for a compressed body, None for identity;
    ``BadRequest`` for any other ``Content-Encoding``."""
    if encoding is None:
        return None
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding '{encoding}' is not supported; send gzip, deflate or identity")
    return name


def decompress_body(body: bytes | bytearray, encoding: str | None, limit: int) -> bytes | bytearray:
    """The body with its ``Content-Encoding`` (gzip, deflate or identity) undone.

    Decompression stops one byte past ``limit`` so a small bomb cannot allocate
    more: ``PayloadTooLarge`` (413) past the limit, ``BadRequest`` for a corrupt or
    truncated stream or an encoding other than these three. (gzip: a gzip wrapper;
    deflate: a zlib wrapper, what HTTP means by it and what tritonclient sends.)"""
    name = content_encoding(encoding)
    if name is None:
        return body
    return inflate(body, name, limit)


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length from ``Inference-Header-Content-Length``, or None
    when the header is absent (the whole body is JSON)."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdecimal()):  # "²" is a digit to isdigit()
        raise BadRequest(f"{INFERENCE_HEADER} must be a non-negative integer; got '{value}'")
    length = int(text)
    if length > body_length:
        raise BadRequest(f"{INFERENCE_HEADER} is {length} but the request body has only {body_length} bytes")
    return length


def read_header(
    body: bytes | bytearray, header_length: str | None, *, max_json_depth: int, max_tensor_elements: int
) -> InferHeader:
    """Parse the JSON header (``header_length`` is the raw
    ``Inference-Header-Content-Length`` value) and its request-level parameters;
    the tensors are decoded by ``decode_request``. ``BadRequest`` when malformed."""
    length = parse_header_length(header_length, len(body))
    if length == 0:
        return InferHeader(None, memoryview(body), None, None)
    header_end = len(body) if length is None else length
    try:
        payload = orjson.loads(memoryview(body)[:header_end])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the inference header is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest('the inference header must be a JSON object: {"inputs": [...]}')
    check_json_shape(payload, max_json_depth, max_tensor_elements)
    parameters = _parameters(payload, "the request")
    if parameters.get("sequence_id") not in (None, 0, ""):
        raise BadRequest("sequence requests are not supported: kiln engines keep no state")
    return InferHeader(
        payload,
        memoryview(body)[header_end:],
        _timeout_ms(parameters),
        parse_priority(parameters.get("priority")),
    )


def decode_request(header: InferHeader, signature: Signature, *, max_tensor_elements: int) -> InferRequest:
    """The feeds of ``signature``'s inputs and the outputs to return. The feeds have
    the engine's dtypes and the shapes the client declared; binary inputs are
    read-only views of the body (copied only when unaligned). Raises ``BadRequest``
    or ``InvalidInput`` (both 400) for anything malformed."""
    if header.payload is None:
        return _parse_raw_binary(header.binary, signature, max_tensor_elements)
    payload = header.payload
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    binary_outputs_by_default = _flag(
        _parameters(payload, "the request"), "binary_data_output", "the request"
    )
    feeds = _decode_inputs(payload.get("inputs"), header.binary, signature, max_tensor_elements)
    outputs = _output_choices(payload.get("outputs"), signature, binary_outputs_by_default)
    return InferRequest(feeds, outputs, request_id, header.timeout_ms, header.priority)


def parse_infer_request(
    body: bytes | bytearray,
    header_length: str | None,
    signature: Signature,
    *,
    max_json_depth: int,
    max_tensor_elements: int,
) -> InferRequest:
    """``read_header`` then ``decode_request``: a whole infer request body decoded
    (what a worker process does with a big JSON body)."""
    header = read_header(
        body, header_length, max_json_depth=max_json_depth, max_tensor_elements=max_tensor_elements
    )
    return decode_request(header, signature, max_tensor_elements=max_tensor_elements)


def parse_big_request(
    body: bytes | bytearray,
    header_length: str | None,
    signature: Signature,
    max_json_depth: int,
    max_tensor_elements: int,
) -> InferRequest:
    """``parse_infer_request`` with positional limits, for a worker process (whose
    binary inputs are copies, not views of a body it does not keep)."""
    request = parse_infer_request(
        body, header_length, signature, max_json_depth=max_json_depth, max_tensor_elements=max_tensor_elements
    )
    return dataclasses.replace(request, feeds={name: np.array(a) for name, a in request.feeds.items()})


def _parameters(container: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = container.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' of {where} must be a JSON object")
    return parameters


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter '{key}' of {where} must be true or false")
    return value


def _timeout_ms(parameters: Mapping[str, Any]) -> float | None:
    """Triton's ``timeout`` is in microseconds; 0 means the engine's own limit."""
    timeout_us = parameters.get("timeout")
    if timeout_us is None:
        return None
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
        raise BadRequest("parameter 'timeout' must be a non-negative integer of microseconds")
    return timeout_us / 1000.0 if timeout_us else None


def _decode_inputs(
    inputs: Any, binary: memoryview, signature: Signature, max_elements: int
) -> dict[str, np.ndarray]:
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    specs = {spec.name: spec for spec in signature.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    total_elements = 0
    for position, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{position}] must be a JSON object")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{position}] needs a string 'name'")
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(f"unknown input '{name}'; this model takes {', '.join(specs)}")
        if name in feeds:
            raise BadRequest(f"input '{name}' is given twice")
        dtype = check_datatype(tensor.get("datatype"), spec)
        shape = check_shape(tensor.get("shape"), name)
        elements = math.prod(shape)
        total_elements += elements
        if elements > max_elements or total_elements > max_elements:
            raise BadRequest(
                f"input '{name}' brings the request to {total_elements} elements; the limit is {max_elements}"
            )
        parameters = _parameters(tensor, f"input '{name}'")
        if "shared_memory_region" in parameters:
            raise BadRequest("shared-memory inputs are not supported; send the data in the body")
        size = parameters.get("binary_data_size")
        if size is None:
            feeds[name] = _json_tensor(tensor, spec, dtype, shape)
            continue
        if "data" in tensor:
            raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"binary_data_size of input '{name}' must be a non-negative integer")
        if offset + size > len(binary):
            raise BadRequest(
                f"input '{name}' needs {size} binary bytes at offset {offset}, but the body has "
                f"{len(binary)} bytes after the inference header"
            )
        feeds[name] = binary_tensor(binary[offset : offset + size], name, dtype, shape)
        offset += size
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary)} bytes after the inference header but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    return feeds  # missing inputs, shapes and batch sizes: Runner.check_feeds


def check_datatype(datatype: Any, spec: TensorSpec) -> np.dtype:
    """The input's numpy dtype, if ``datatype`` names the engine's own."""
    expected = datatype_of(spec.dtype)
    if datatype == expected:
        return DATATYPES[expected]
    if datatype == "BYTES":
        raise BadRequest(
            f"input '{spec.name}' is BYTES, but kiln engines take no strings; the model expects {expected}"
        )
    if not isinstance(datatype, str):
        raise BadRequest(f"input '{spec.name}' needs a string 'datatype' ({expected})")
    raise BadRequest(f"input '{spec.name}' has datatype {datatype}; the model expects {expected}")


def check_shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise BadRequest(f"the shape of input '{name}' must be a list of non-negative integers")
    return tuple(shape)


def _json_tensor(
    tensor: Mapping[str, Any], spec: TensorSpec, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray:
    if "data" not in tensor:
        raise BadRequest(f"input '{spec.name}' has neither 'data' nor binary_data_size")
    try:
        raw = np.asarray(tensor["data"])
    except ValueError as exc:
        raise BadRequest(f"the data of input '{spec.name}' is not a rectangular list: {exc}") from None
    if raw.dtype.kind not in "biuf":
        raise BadRequest(f"the data of input '{spec.name}' must hold only numbers (or booleans)")
    if raw.size != math.prod(shape):
        raise BadRequest(
            f"input '{spec.name}' has {raw.size} elements but its shape {list(shape)} "
            f"needs {math.prod(shape)}"
        )
    return cast_checked(raw.reshape(shape), dtype.newbyteorder("="), spec.name)


def binary_tensor(data: memoryview, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise BadRequest(
            f"input '{name}' has {len(data)} binary bytes; shape {list(shape)} of "
            f"{datatype_of(dtype)} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise BadRequest(f"input '{name}' is BOOL but has bytes other than 0 and 1")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    elif not array.flags.aligned:
        # The header's length decides where the bytes start; engines want aligned data.
        array = array.copy()
    return array


def _parse_raw_binary(body: memoryview, signature: Signature, max_elements: int) -> InferRequest:
    """``Inference-Header-Content-Length: 0``: the body is the one input's bytes,
    batch 1, and every output comes back binary."""
    if len(signature.inputs) != 1:
        names = ", ".join(spec.name for spec in signature.inputs)
        raise BadRequest(
            f"a raw binary request ({INFERENCE_HEADER}: 0) needs a single-input model; this one takes {names}"
        )
    spec = signature.inputs[0]
    dims = spec.shape[1:] if signature.batchable else spec.shape
    if any(dim < 0 for dim in dims):
        raise BadRequest(
            f"a raw binary request needs a fixed input shape; input '{spec.name}' has "
            f"shape {list(spec.shape)}: send a JSON header with the shape"
        )
    shape = (1, *dims) if signature.batchable else tuple(dims)
    if math.prod(shape) > max_elements:
        raise BadRequest(f"input '{spec.name}' has more than {max_elements} elements")
    dtype = DATATYPES[datatype_of(spec.dtype)]
    feeds = {spec.name: binary_tensor(body, spec.name, dtype, shape)}
    outputs = tuple(OutputChoice(out.name, binary=True) for out in signature.outputs)
    return InferRequest(feeds, outputs, None, None)


def _output_choices(
    requested: Any, signature: Signature, binary_by_default: bool
) -> tuple[OutputChoice, ...]:
    """The outputs to return in order: the requested ones, or all of them."""
    if requested is None or requested == []:
        return tuple(OutputChoice(spec.name, binary_by_default) for spec in signature.outputs)
    if not isinstance(requested, list):
        raise BadRequest("'outputs' must be a list of {\"name\": ...} objects")
    known = [spec.name for spec in signature.outputs]
    choices: list[OutputChoice] = []
    for position, output in enumerate(requested):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{position}] must be an object with a string 'name'")
        name = output["name"]
        if name not in known:
            raise BadRequest(f"unknown output '{name}'; this model returns {', '.join(known)}")
        if any(choice.name == name for choice in choices):
            raise BadRequest(f"output '{name}' is requested twice")
        parameters = _parameters(output, f"output '{name}'")
        if parameters.get("classification"):
            raise BadRequest("the classification extension is not supported")
        if "shared_memory_region" in parameters:
            raise BadRequest("shared-memory outputs are not supported")
        binary = binary_by_default
        if "binary_data" in parameters:  # the output's own choice overrides the request's
            binary = _flag(parameters, "binary_data", f"output '{name}'")
        choices.append(OutputChoice(name, binary))
    return tuple(choices)


# -- response body ------------------------------------------------------------


def encode_infer_response(
    outputs: Mapping[str, np.ndarray],
    choices: Sequence[OutputChoice],
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers.

    JSON outputs carry flat row-major ``data``. When any output is binary the body
    is the JSON header followed by those outputs' bytes in order, with
    ``Content-Type: application/octet-stream`` and ``Inference-Header-Content-Length``;
    otherwise it is plain ``application/json``."""
    tensors: list[dict[str, Any]] = []
    binary_parts: list[np.ndarray] = []
    for choice in choices:
        array = outputs[choice.name]
        tensor: dict[str, Any] = {
            "name": choice.name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if choice.binary:
            array = little_endian_contiguous(array)
            tensor["parameters"] = {"binary_data_size": array.nbytes}
            binary_parts.append(array)
        else:
            tensor["data"] = np.ascontiguousarray(array).ravel()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = tensors
    header = dumps(response)
    if not binary_parts:
        return header, {"Content-Type": "application/json"}
    # bytes.join reads the arrays' buffers directly: one copy into the body.
    body = b"".join([header, *(part.data for part in binary_parts)])
    return body, {
        "Content-Type": "application/octet-stream",
        INFERENCE_HEADER: str(len(header)),
    }


def little_endian_contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` as binary tensor data carries it: little-endian, row-major."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)
