"""KServe v2 codec: request bodies to feeds, outputs to response bodies (no server)."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import numpy as np
import orjson
import pytest
from tritonclient.http import InferResult

from engines.errors import InvalidInput
from engines.types import Signature, TensorSpec
from service.errors import BadRequest, PayloadTooLarge
from service.protocols.kserve_codec import (
    DATATYPES,
    InferRequest,
    OutputChoice,
    config_type_of,
    datatype_of,
    decompress_body,
    encode_infer_response,
    parse_infer_request,
)

MAX_ELEMENTS = 10_000
MAX_DEPTH = 8


def signature(*inputs: TensorSpec, outputs: tuple[TensorSpec, ...] = (), batchable: bool = True) -> Signature:
    outputs = outputs or (TensorSpec("y", "float32", (-1, 4)),)
    return Signature(inputs=inputs, outputs=outputs, batchable=batchable)


MLP = signature(TensorSpec("x", "float32", (-1, 3)))
TWO = signature(
    TensorSpec("a", "float32", (-1, 4)),
    TensorSpec("b", "int64", (-1, 2)),
    outputs=(TensorSpec("sum", "float32", (-1, 4)), TensorSpec("prod", "float32", (-1, 4))),
)


def body_of(header: dict[str, Any], *binary: bytes) -> tuple[bytes, str | None]:
    """A request body and its Inference-Header-Content-Length, as tritonclient builds them."""
    json_bytes = orjson.dumps(header)
    if not binary:
        return json_bytes, None
    return json_bytes + b"".join(binary), str(len(json_bytes))


def parse(body: bytes, header_length: str | None, sig: Signature = MLP, **limits: int) -> InferRequest:
    return parse_infer_request(
        body,
        header_length,
        sig,
        max_json_depth=limits.get("max_json_depth", MAX_DEPTH),
        max_tensor_elements=limits.get("max_tensor_elements", MAX_ELEMENTS),
    )


def binary_input(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": array.nbytes},
    }


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(7)
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)
    return (rng.standard_normal(shape) * 10).astype(dtype)


# -- datatypes ----------------------------------------------------------------


def test_every_numeric_dtype_has_a_v2_datatype_and_config_type() -> None:
    assert datatype_of("float32") == "FP32"
    assert datatype_of(np.dtype(np.float16)) == "FP16"
    assert datatype_of("bool") == "BOOL"
    assert config_type_of("int64") == "TYPE_INT64"
    assert config_type_of("uint8") == "TYPE_UINT8"


# -- binary requests and responses --------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_binary_round_trip_for_every_datatype(datatype: str) -> None:
    dtype = DATATYPES[datatype]
    sig = signature(
        TensorSpec("x", str(dtype.newbyteorder("=")), (-1, 3)),
        outputs=(TensorSpec("x_out", str(dtype.newbyteorder("=")), (-1, 3)),),
    )
    array = sample(datatype)
    body, length = body_of(
        {
            "inputs": [binary_input("x", array, datatype)],
            "parameters": {"binary_data_output": True},
        },
        array.tobytes(),
    )

    request = parse(body, length, sig)

    assert request.feeds["x"].dtype == dtype
    np.testing.assert_array_equal(request.feeds["x"], array)
    assert request.outputs == (OutputChoice("x_out", binary=True),)

    content, headers = encode_infer_response(
        {"x_out": request.feeds["x"]},
        request.outputs,
        model_name="m",
        model_version="1",
        request_id=None,
    )
    assert headers["Content-Type"] == "application/octet-stream"
    result = InferResult.from_response_body(
        content, header_length=int(headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(result.as_numpy("x_out"), array)
    assert result.get_output("x_out")["datatype"] == datatype


def test_binary_inputs_are_sliced_in_order_and_are_not_copied_when_aligned() -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.array([[1, 2], [3, 4]], dtype=np.int64)
    header = {"inputs": [binary_input("a", a, "FP32"), binary_input("b", b, "INT64")]}
    json_bytes = orjson.dumps(header)
    padding = b" " * (-len(json_bytes) % 8)  # JSON allows trailing spaces: align the binary part
    body = json_bytes + padding + a.tobytes() + b.tobytes()

    request = parse(body, str(len(json_bytes + padding)), TWO)

    np.testing.assert_array_equal(request.feeds["a"], a)
    np.testing.assert_array_equal(request.feeds["b"], b)
    assert not request.feeds["a"].flags.owndata  # a view of the body


def test_unaligned_binary_input_is_copied_into_an_aligned_array() -> None:
    a = np.ones((1, 4), np.float32)
    b = np.array([[1, 2]], dtype=np.int64)
    header = {"inputs": [binary_input("a", a, "FP32"), binary_input("b", b, "INT64")]}
    json_bytes = orjson.dumps(header)
    json_bytes += b" " * (1 + len(json_bytes) % 2)  # an odd header length: nothing is aligned

    request = parse(json_bytes + a.tobytes() + b.tobytes(), str(len(json_bytes)), TWO)

    for name, expected in (("a", a), ("b", b)):
        assert request.feeds[name].flags.aligned
        np.testing.assert_array_equal(request.feeds[name], expected)


def test_bool_binary_input_refuses_bytes_other_than_zero_and_one() -> None:
    sig = signature(TensorSpec("mask", "bool", (-1, 2)))
    body, length = body_of(
        {
            "inputs": [
                {
                    "name": "mask",
                    "shape": [1, 2],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 2},
                }
            ]
        },
        b"\x01\x02",
    )
    with pytest.raises(BadRequest, match="BOOL but has bytes other than 0 and 1"):
        parse(body, length, sig)


def test_response_mixes_binary_and_json_outputs_in_the_requested_order() -> None:
    outputs = {"sum": np.ones((1, 4), np.float32), "prod": np.full((1, 4), 2.0, np.float32)}
    choices = (OutputChoice("prod", binary=False), OutputChoice("sum", binary=True))

    content, headers = encode_infer_response(
        outputs, choices, model_name="two", model_version="3", request_id="req-7"
    )

    length = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(content[:length])
    assert header["model_name"] == "two"
    assert header["model_version"] == "3"
    assert header["id"] == "req-7"
    assert [o["name"] for o in header["outputs"]] == ["prod", "sum"]
    assert header["outputs"][0]["data"] == [2.0] * 4
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert content[length:] == outputs["sum"].tobytes()


def test_all_json_response_is_plain_json_without_the_header_length() -> None:
    content, headers = encode_infer_response(
        {"y": np.array([[1.5, 2.5]], np.float32)},
        (OutputChoice("y", binary=False),),
        model_name="m",
        model_version="1",
        request_id=None,
    )
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(content) == {
        "model_name": "m",
        "model_version": "1",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}],
    }


# -- JSON requests ------------------------------------------------------------


def test_json_data_nested_and_flat_give_the_same_feed() -> None:
    values = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    flat = [v for row in values for v in row]
    nested = parse(*body_of({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": values}]}))
    flat_request = parse(
        *body_of({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": flat}]})
    )

    np.testing.assert_array_equal(nested.feeds["x"], flat_request.feeds["x"])
    assert nested.feeds["x"].dtype == np.float32
    assert nested.feeds["x"].shape == (2, 3)


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BOOL", [True, False, True], np.array([True, False, True])),
        ("FP16", [0.5, -2.0, 1024.0], np.array([0.5, -2.0, 1024.0], np.float16)),
        ("INT64", [1, -2, 3], np.array([1, -2, 3], np.int64)),
        ("UINT8", [0, 7, 255], np.array([0, 7, 255], np.uint8)),
        ("FP64", [0.1, 0.2, 0.3], np.array([0.1, 0.2, 0.3])),
    ],
)
def test_json_data_of_other_datatypes(datatype: str, data: list[Any], expected: np.ndarray) -> None:
    dtype = DATATYPES[datatype].newbyteorder("=")
    sig = signature(TensorSpec("x", str(dtype), (-1, 3)))
    request = parse(
        *body_of({"inputs": [{"name": "x", "shape": [1, 3], "datatype": datatype, "data": data}]}),
        sig,
    )
    assert request.feeds["x"].dtype == dtype
    np.testing.assert_array_equal(request.feeds["x"], expected.reshape(1, 3))


def test_request_options_id_timeout_and_output_choices() -> None:
    header = {
        "id": "abc",
        "parameters": {"timeout": 2500, "binary_data_output": True, "priority": 1},
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [5, 6]},
        ],
        "outputs": [{"name": "prod", "parameters": {"binary_data": False}}, {"name": "sum"}],
    }
    request = parse(*body_of(header), TWO)
    assert request.request_id == "abc"
    assert request.timeout_ms == 2.5
    assert request.outputs == (OutputChoice("prod", binary=False), OutputChoice("sum", binary=True))


def test_no_outputs_named_means_all_of_them_as_json_unless_binary_is_asked() -> None:
    header = {
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [5, 6]},
        ],
    }
    request = parse(*body_of(header), TWO)
    assert request.outputs == (OutputChoice("sum", False), OutputChoice("prod", False))
    assert request.timeout_ms is None
    assert request.request_id is None


# -- raw binary ---------------------------------------------------------------


def test_raw_binary_body_is_one_row_of_the_single_input() -> None:
    x = np.arange(3, dtype=np.float32)
    request = parse(x.tobytes(), "0", MLP)
    np.testing.assert_array_equal(request.feeds["x"], x.reshape(1, 3))
    assert request.outputs == (OutputChoice("y", binary=True),)


def test_raw_binary_on_an_unbatched_model_uses_its_fixed_shape() -> None:
    sig = signature(TensorSpec("x", "float32", (1, 6)), batchable=False)
    request = parse(np.ones(6, np.float32).tobytes(), "0", sig)
    assert request.feeds["x"].shape == (1, 6)


@pytest.mark.parametrize(
    ("sig", "body", "message"),
    [
        (TWO, b"\x00" * 16, "needs a single-input model; this one takes a, b"),
        (
            signature(TensorSpec("x", "float32", (-1, -1))),
            b"\x00" * 16,
            "needs a fixed input shape",
        ),
        (MLP, b"\x00" * 8, "has 8 binary bytes; shape \\[1, 3\\] of FP32 needs 12"),
    ],
)
def test_raw_binary_refusals(sig: Signature, body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse(body, "0", sig)


# -- malformed requests -------------------------------------------------------

X_FP32 = {"name": "x", "shape": [1, 3], "datatype": "FP32"}


def binary_x(size: int = 12, **changes: Any) -> dict[str, Any]:
    return {"inputs": [{**X_FP32, "parameters": {"binary_data_size": size}, **changes}]}


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (
            b"{}" + b"\x00" * 4,
            "100",
            "Inference-Header-Content-Length is 100 but the request body has only 6 bytes",
        ),
        (b"{}", "-1", "must be a non-negative integer; got '-1'"),
        (b"{}", "ten", "must be a non-negative integer; got 'ten'"),
        (b"{}", "\u00b2", "must be a non-negative integer"),
        (b"{not json", None, "the inference header is not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"{}", None, "'inputs' must be a non-empty list"),
        (orjson.dumps({"inputs": []}), None, "'inputs' must be a non-empty list"),
        (orjson.dumps({"inputs": [5]}), None, "inputs\\[0\\] must be a JSON object"),
        (orjson.dumps({"id": 7, "inputs": [X_FP32]}), None, "'id' must be a string"),
        (orjson.dumps({"parameters": [], "inputs": [X_FP32]}), None, "'parameters' of the request"),
    ],
)
def test_malformed_envelopes(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse(body, length)


@pytest.mark.parametrize(
    ("header", "binary", "message"),
    [
        # binary sizes against the body
        (binary_x(12), b"\x00" * 8, "needs 12 binary bytes at offset 0, but the body has 8"),
        (
            binary_x(12),
            b"\x00" * 16,
            "16 bytes after the inference header but the inputs' binary_data_size add up to 12",
        ),
        (binary_x(8), b"\x00" * 8, "has 8 binary bytes; shape \\[1, 3\\] of FP32 needs 12"),
        (
            binary_x(-4),
            b"\x00" * 12,
            "binary_data_size of input 'x' must be a non-negative integer",
        ),
        (binary_x(12, data=[1, 2, 3]), b"\x00" * 12, "has both 'data' and binary_data_size"),
        (
            binary_x(12, parameters={"shared_memory_region": "r"}),
            b"\x00" * 12,
            "shared-memory inputs are not supported",
        ),
        # shapes
        (
            binary_x(12, shape=[1, -3]),
            b"\x00" * 12,
            "shape of input 'x' must be a list of non-negative integers",
        ),
        (
            binary_x(12, shape=[1, 1.5]),
            b"\x00" * 12,
            "shape of input 'x' must be a list of non-negative integers",
        ),
        (
            binary_x(12, shape=[1, "3"]),
            b"\x00" * 12,
            "shape of input 'x' must be a list of non-negative integers",
        ),
        (
            binary_x(12, shape=[True, 3]),
            b"\x00" * 12,
            "shape of input 'x' must be a list of non-negative integers",
        ),
        (
            binary_x(12, shape="1,3"),
            b"\x00" * 12,
            "shape of input 'x' must be a list of non-negative integers",
        ),
        # datatypes
        (
            binary_x(12, datatype="FP64"),
            b"\x00" * 12,
            "input 'x' has datatype FP64; the model expects FP32",
        ),
        (
            binary_x(12, datatype="BYTES"),
            b"\x00" * 12,
            "BYTES, but kiln engines take no strings; the model expects FP32",
        ),
        (binary_x(12, datatype=None), b"\x00" * 12, "needs a string 'datatype' \\(FP32\\)"),
        # names
        (binary_x(12, name="z"), b"\x00" * 12, "unknown input 'z'; this model takes x"),
        (binary_x(12, name=3), b"\x00" * 12, "inputs\\[0\\] needs a string 'name'"),
    ],
)
def test_malformed_binary_inputs(header: dict[str, Any], binary: bytes, message: str) -> None:
    json_bytes = orjson.dumps(header)
    with pytest.raises(BadRequest, match=message):
        parse(json_bytes + binary, str(len(json_bytes)))


def test_binary_data_size_without_the_header_length_is_refused() -> None:
    with pytest.raises(BadRequest, match="needs 12 binary bytes at offset 0, but the body has 0"):
        parse(orjson.dumps(binary_x(12)), None)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({**X_FP32, "data": [1, 2]}, "input 'x' has 2 elements but its shape \\[1, 3\\] needs 3"),
        ({**X_FP32, "data": [[1, 2], [3]]}, "not a rectangular list"),
        ({**X_FP32, "data": ["a", "b", "c"]}, "must hold only numbers"),
        ({**X_FP32, "data": [{"v": 1}, 2, 3]}, "must hold only numbers"),
        (X_FP32, "has neither 'data' nor binary_data_size"),
    ],
)
def test_malformed_json_inputs(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse(*body_of({"inputs": [tensor]}))


def test_json_values_outside_the_input_dtype_are_refused() -> None:
    sig = signature(TensorSpec("ids", "uint8", (-1, 2)))
    with pytest.raises(InvalidInput, match="outside the range of uint8"):
        parse(
            *body_of({"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "UINT8", "data": [1, 300]}]}),
            sig,
        )
    sig = signature(TensorSpec("ids", "int64", (-1, 2)))
    with pytest.raises(InvalidInput, match="non-integral"):
        parse(
            *body_of({"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2.5]}]}),
            sig,
        )


def test_duplicated_inputs_are_refused() -> None:
    # Missing inputs are the runner's to refuse (Runner.check_feeds), once for every protocol.
    a = {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    with pytest.raises(BadRequest, match="input 'a' is given twice"):
        parse(*body_of({"inputs": [a, a]}), TWO)


def test_too_many_elements_are_refused_before_any_array_is_built() -> None:
    header = binary_x(12, shape=[1000, 1000])
    json_bytes = orjson.dumps(header)
    with pytest.raises(BadRequest, match="brings the request to 1000000 elements; the limit is 100"):
        parse(json_bytes + b"\x00" * 12, str(len(json_bytes)), max_tensor_elements=100)


def test_deep_json_is_refused() -> None:
    data: Any = [1.0]
    for _ in range(20):
        data = [data]
    with pytest.raises(BadRequest, match="nests deeper than 8 levels"):
        parse(*body_of({"inputs": [{**X_FP32, "data": data}]}))


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([{"name": "nope"}], "unknown output 'nope'; this model returns y"),
        ([{"name": "y"}, {"name": "y"}], "output 'y' is requested twice"),
        ({"name": "y"}, "'outputs' must be a list"),
        (
            [{"name": "y", "parameters": {"binary_data": "yes"}}],
            "'binary_data' of output 'y' must be true or false",
        ),
        (
            [{"name": "y", "parameters": {"classification": 3}}],
            "classification extension is not supported",
        ),
    ],
)
def test_malformed_output_choices(outputs: Any, message: str) -> None:
    header = {"inputs": [{**X_FP32, "data": [1, 2, 3]}], "outputs": outputs}
    with pytest.raises(BadRequest, match=message):
        parse(*body_of(header))


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"timeout": -1}, "'timeout' must be a non-negative integer of microseconds"),
        ({"timeout": "1s"}, "'timeout' must be a non-negative integer of microseconds"),
        ({"binary_data_output": 1}, "'binary_data_output' of the request must be true or false"),
        ({"sequence_id": 4}, "sequence requests are not supported"),
    ],
)
def test_malformed_request_parameters(parameters: dict[str, Any], message: str) -> None:
    header = {"parameters": parameters, "inputs": [{**X_FP32, "data": [1, 2, 3]}]}
    with pytest.raises(BadRequest, match=message):
        parse(*body_of(header))


# -- Content-Encoding ---------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("identity", lambda b: b),
        (None, lambda b: b),
    ],
)
def test_request_bodies_are_decompressed(encoding: str | None, compress: Any) -> None:
    body = b'{"inputs": []}' * 10
    assert decompress_body(compress(body), encoding, 1024) == body


def test_decompression_stops_at_the_request_limit() -> None:
    bomb = gzip.compress(b"\x00" * 10_000_000)
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge, match="decompressed request body is larger than the limit of 4096"):
        decompress_body(bomb, "gzip", 4096)


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        (b"not gzip at all", "gzip", "cannot be decompressed"),
        (gzip.compress(b"x" * 1000)[:-12], "gzip", "truncated"),
        (zlib.compress(b"abc") + b"tail", "deflate", "data after the end of its stream"),
        (b"abc", "br", "Content-Encoding 'br' is not supported"),
    ],
)
def test_bad_compressed_bodies_are_refused(body: bytes, encoding: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decompress_body(body, encoding, 1 << 20)
