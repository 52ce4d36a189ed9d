"""Fuzzing the request paths with hypothesis: random and mutated JSON bodies to
/predict and /v2/.../infer, binary v2 bodies with wrong lengths, random and
mutated multipart uploads, random bytes and mutated real models as ONNX.

Whatever comes in, the answer is never a 5xx, errors are JSON in the protocol's
error shape, and the server still serves afterwards. Each test prints how many
cases it ran (``pytest -s`` shows them)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.errors import InvalidModel, UnsupportedModel
from engines.onnx_model import load_model, read_signature
from service.app import create_app
from service.errors import BadRequest
from service.lifecycle.options import parse_upload_fields, to_options
from service.settings import Settings
from tests.conftest import upload, wait_for_state

pytestmark = pytest.mark.slow  # about 40 s in all

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()

MAX_REQUEST = 256 * 1024
ROW = [0.5] * 16


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-store")


@pytest.fixture(scope="module")
def client(store: Path, model_files: dict[str, Path]) -> Iterator[TestClient]:
    settings_ = Settings(
        store=store,
        backend="onnxruntime",
        max_request_bytes=MAX_REQUEST,
        max_upload_bytes=1024 * 1024,
        max_data_bytes=64 * 1024,
        max_batch_size=8,
    )
    with TestClient(create_app(settings_)) as test_client:
        upload(test_client, model_files["mlp"], "mlp")
        upload(test_client, model_files["two_in_two_out"], "pair")
        for name in ("mlp", "pair"):
            assert wait_for_state(test_client, name)["state"] == "ready"
        yield test_client
    print(f"\nfuzz cases: {dict(CASES)}; total {sum(CASES.values())}")
    print(f"statuses answered: {dict(sorted(STATUSES.items()))}")


@pytest.fixture(autouse=True)
def still_healthy(client: TestClient, request: pytest.FixtureRequest) -> Iterator[None]:
    """After each fuzz test: live, ready, and a real prediction is still right."""
    yield
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    response = client.post("/predict", json={"engine": "mlp", "inputs": [ROW]})
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]["y"][0]) == 4
    print(f"\n{request.node.name}: {CASES[request.node.name]} cases")


def count(request: pytest.FixtureRequest) -> None:
    CASES[request.node.name] += 1


def assert_answer(response: Any, *, kserve: bool) -> None:
    """No 5xx; errors are JSON in the protocol's error shape."""
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code < 400:
        return
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    if kserve:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert isinstance(body["error"], str) and body["error"]
    else:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# -- strategies -----------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=40,
)
numbers = st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-(2**40), 2**40)


@st.composite
def nested_numbers(draw: st.DrawFn) -> Any:
    """Nested lists of numbers, sometimes ragged, of 0-4 levels."""
    rank = draw(st.integers(0, 4))
    if rank == 0:
        return draw(numbers)
    dims = draw(st.lists(st.integers(0, 20), min_size=rank, max_size=rank))
    value: Any = draw(numbers)
    for dim in reversed(dims):
        value = [value] * dim
    if value and draw(st.booleans()) and isinstance(value, list):
        value = [*value[:-1], draw(json_values)]  # ragged or mixed tail
    return value


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_edits: int = 8) -> bytes:
    """``data`` with a few bytes flipped, inserted, deleted, duplicated, or truncated."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "truncate"]))
        position = draw(st.integers(0, max(len(out) - 1, 0)))
        if operation == "flip" and out:
            out[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and out:
            out[position] = draw(st.integers(0, 255))
        elif operation == "insert":
            out[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del out[position : position + draw(st.integers(1, 16))]
        elif operation == "duplicate":
            out[position:position] = out[position : position + draw(st.integers(1, 64))]
        elif operation == "truncate":
            del out[position:]
    return bytes(out)


def dumps(value: Any) -> bytes:
    """JSON as Python writes it: NaN and Infinity included, which orjson refuses."""
    return json.dumps(value).encode()


# -- /predict ---------------------------------------------------------------------------

ENGINE_NAMES = st.sampled_from(["mlp", "pair", "nope", "", "../etc", "mlp\x00"]) | st.text(max_size=10)


@st.composite
def predict_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["engine"] = draw(ENGINE_NAMES | json_values)
    if draw(st.integers(0, 9)):
        inputs = draw(
            nested_numbers()
            | st.dictionaries(st.sampled_from(["x", "a", "b", "z"]) | st.text(max_size=4), nested_numbers())
            | json_values
        )
        body["inputs"] = inputs
    if draw(st.booleans()):
        body["version"] = draw(st.integers(-2, 3) | json_values)
    if draw(st.booleans()):
        body["timeout_ms"] = draw(numbers.filter(lambda v: not 0 < v < 1000) | json_values)
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(max_size=6))] = draw(json_values)
    return body


@st.composite
def near_valid_arrays(draw: st.DrawFn, columns: int) -> Any:
    """Rows of the right width most of the time; 0 to 10 rows (the limit is 8);
    floats, integers, booleans, or out-of-range values."""
    rows = draw(st.integers(0, 10))
    width = draw(st.sampled_from([columns] * 4 + [columns - 1, columns + 1, 0]))
    element = draw(st.sampled_from(["float", "float", "int", "bool", "huge"]))
    values = {
        "float": st.floats(-1e3, 1e3, width=32),
        "int": st.integers(-1000, 1000),
        "bool": st.booleans(),
        "huge": st.sampled_from([1e39, -1e39, 2**64, float("nan"), float("inf")]),
    }[element]
    return [[draw(values) for _ in range(width)] for _ in range(rows)]


@st.composite
def near_valid_predict(draw: st.DrawFn) -> Any:
    engine = draw(st.sampled_from(["mlp", "pair"]))
    if engine == "mlp":
        inputs: Any = draw(near_valid_arrays(16))
        if draw(st.booleans()):
            inputs = {"x": inputs}
    else:
        inputs = {
            name: draw(near_valid_arrays(4))
            for name in draw(st.sampled_from([("a", "b"), ("a",), ("b", "a", "c")]))
        }
    body: dict[str, Any] = {"engine": engine, "inputs": inputs}
    if draw(st.booleans()):
        body["version"] = draw(st.sampled_from([1, 1, 2, 0, -1, True, 1.0, "1"]))
    if draw(st.booleans()):
        body["timeout_ms"] = draw(st.sampled_from([30_000, 1000.5, 0, -1, "5", None, True]))
    return body


@FUZZ
@given(body=json_values)
def test_predict_random_json(client: TestClient, request: pytest.FixtureRequest, body: Any) -> None:
    count(request)
    assert_answer(client.post("/predict", content=dumps(body)), kserve=False)


@FUZZ
@given(body=predict_bodies())
def test_predict_structured_json(client: TestClient, request: pytest.FixtureRequest, body: Any) -> None:
    count(request)
    assert_answer(client.post("/predict", content=dumps(body)), kserve=False)


@FUZZ
@given(body=near_valid_predict())
def test_predict_near_valid_json(client: TestClient, request: pytest.FixtureRequest, body: Any) -> None:
    count(request)
    assert_answer(client.post("/predict", content=dumps(body)), kserve=False)


VALID_PREDICT = orjson.dumps({"engine": "pair", "inputs": {"a": [[1.0] * 4] * 2, "b": [[2.0] * 4] * 2}})


@FUZZ
@given(body=mutated(VALID_PREDICT))
def test_predict_mutated_bytes(client: TestClient, request: pytest.FixtureRequest, body: bytes) -> None:
    count(request)
    assert_answer(client.post("/predict", content=body), kserve=False)


# -- /v2/models/.../infer ------------------------------------------------------------------

MODEL_PATHS = st.sampled_from(
    [
        "mlp",
        "pair",
        "nope",
        "mlp/versions/1",
        "mlp/versions/2",
        "mlp/versions/0",
        "mlp/versions/x",
        "mlp/versions/%C2%B2",
        "pair/versions/-1",
    ]
)
DATATYPES = (
    st.sampled_from(
        ["FP32", "FP16", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "BF16", "fp32", ""]
    )
    | json_values
)
SHAPES = st.lists(st.integers(-2, 40) | st.integers(-(2**63), 2**63), max_size=4) | json_values


@st.composite
def v2_tensor(draw: st.DrawFn, binary: bool) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "a", "b", "zz"]) | json_values),
        "shape": draw(SHAPES),
        "datatype": draw(DATATYPES),
    }
    if binary:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-4, 200) | json_values)}
        if draw(st.integers(0, 9)) == 0:
            tensor["data"] = draw(nested_numbers())
    else:
        if draw(st.integers(0, 9)):
            tensor["data"] = draw(nested_numbers() | json_values)
        if draw(st.integers(0, 5)) == 0:
            tensor["parameters"] = draw(json_values)
    return tensor


@st.composite
def v2_headers(draw: st.DrawFn, binary: bool) -> dict[str, Any]:
    header: dict[str, Any] = {"inputs": draw(st.lists(v2_tensor(binary), max_size=3) | json_values)}
    if draw(st.booleans()):
        header["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["y", "sum", "prod", "nope"]) | json_values},
                    optional={
                        "parameters": st.fixed_dictionaries(
                            {}, optional={"binary_data": json_values, "classification": json_values}
                        )
                    },
                ),
                max_size=3,
            )
            | json_values
        )
    if draw(st.booleans()):
        header["parameters"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "binary_data_output": json_values,
                    "timeout": st.integers(-5, 10**7) | json_values,
                    "sequence_id": json_values,
                    "priority": json_values,
                },
            )
            | json_values
        )
    if draw(st.booleans()):
        header["id"] = draw(json_values)
    return header


def encode(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    return body


ENCODINGS = st.sampled_from([None, None, None, "gzip", "deflate", "identity", "br", "gzip, deflate"])


@FUZZ
@given(path=MODEL_PATHS, header=v2_headers(binary=False), encoding=ENCODINGS)
def test_v2_json_infer(
    client: TestClient, request: pytest.FixtureRequest, path: str, header: Any, encoding: str | None
) -> None:
    count(request)
    headers = {"Content-Encoding": encoding} if encoding else {}
    response = client.post(
        f"/v2/models/{path}/infer", content=encode(dumps(header), encoding), headers=headers
    )
    assert_answer(response, kserve=True)


@st.composite
def near_valid_v2(draw: st.DrawFn) -> tuple[str, Any]:
    """JSON infer requests for the real engines, one thing off at a time."""
    model = draw(st.sampled_from(["mlp", "pair"]))
    names, columns = (["x"], 16) if model == "mlp" else (["a", "b"], 4)
    inputs = []
    for name in names:
        data = draw(near_valid_arrays(columns))
        shape = [len(data), len(data[0]) if data else columns]
        if draw(st.integers(0, 4)) == 0:
            shape = draw(st.lists(st.integers(0, 20), max_size=3))
        flat = [v for row in data for v in row] if draw(st.booleans()) else data
        inputs.append(
            {
                "name": name,
                "shape": shape,
                "datatype": draw(st.sampled_from(["FP32"] * 5 + ["FP64", "INT64"])),
                "data": flat,
            }
        )
    header: dict[str, Any] = {"inputs": draw(st.permutations(inputs))}
    if draw(st.booleans()):
        header["parameters"] = {"binary_data_output": draw(st.booleans())}
    return model, header


@FUZZ
@given(case=near_valid_v2(), encoding=ENCODINGS)
def test_v2_near_valid_json_infer(
    client: TestClient, request: pytest.FixtureRequest, case: tuple[str, Any], encoding: str | None
) -> None:
    count(request)
    model, header = case
    headers = {"Content-Encoding": encoding} if encoding else {}
    response = client.post(
        f"/v2/models/{model}/infer", content=encode(dumps(header), encoding), headers=headers
    )
    assert_answer(response, kserve=True)


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A JSON header, then binary bytes that may or may not add up; the length
    header correct, off, absent, or not a number."""
    header = dumps(draw(v2_headers(binary=True)))
    tail = draw(st.binary(max_size=300))
    if draw(st.booleans()):  # often the right size for the mlp's x[1, 16]
        tail = np.zeros((1, 16), np.float32).tobytes()[: draw(st.integers(0, 64))]
    length = draw(
        st.sampled_from(["exact", "exact", "short", "long", "absent", "zero"])
        | st.text(alphabet="0123456789-+ x²٣", max_size=6)
    )
    headers: dict[str, str] = {}
    if length == "exact":
        headers["Inference-Header-Content-Length"] = str(len(header))
    elif length == "short":
        headers["Inference-Header-Content-Length"] = str(max(len(header) - draw(st.integers(1, 20)), 0))
    elif length == "long":
        headers["Inference-Header-Content-Length"] = str(len(header) + draw(st.integers(1, 10**6)))
    elif length == "zero":
        headers["Inference-Header-Content-Length"] = "0"
    elif length != "absent":
        headers["Inference-Header-Content-Length"] = length
    body = header + tail
    encoding = draw(ENCODINGS)
    if encoding:
        headers["Content-Encoding"] = encoding
    return encode(body, encoding), headers


@FUZZ
@given(path=MODEL_PATHS, case=binary_requests())
def test_v2_binary_infer(
    client: TestClient, request: pytest.FixtureRequest, path: str, case: tuple[bytes, dict[str, str]]
) -> None:
    count(request)
    body, headers = case
    raw_headers = {k: v.encode("utf-8") for k, v in headers.items()}  # "²" goes as UTF-8 bytes
    assert_answer(client.post(f"/v2/models/{path}/infer", content=body, headers=raw_headers), kserve=True)


VALID_BINARY_HEADER = orjson.dumps(
    {
        "inputs": [
            {"name": "x", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": 128}}
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
)
VALID_BINARY = VALID_BINARY_HEADER + np.ones((2, 16), np.float32).tobytes()


@FUZZ
@given(body=mutated(VALID_BINARY), shift=st.integers(-8, 8))
def test_v2_binary_mutated(
    client: TestClient, request: pytest.FixtureRequest, body: bytes, shift: int
) -> None:
    count(request)
    headers = {"Inference-Header-Content-Length": str(max(len(VALID_BINARY_HEADER) + shift, 0))}
    assert_answer(client.post("/v2/models/mlp/infer", content=body, headers=headers), kserve=True)


@FUZZ
@given(body=st.binary(max_size=200) | st.just(np.ones(16, np.float32).tobytes()), path=MODEL_PATHS)
def test_v2_raw_binary(client: TestClient, request: pytest.FixtureRequest, body: bytes, path: str) -> None:
    count(request)
    response = client.post(
        f"/v2/models/{path}/infer", content=body, headers={"Inference-Header-Content-Length": "0"}
    )
    assert_answer(response, kserve=True)


# -- POST /engines ------------------------------------------------------------------------

FIELD_NAMES = st.sampled_from(
    [
        "name",
        "model",
        "calibration",
        "validation",
        "precision",
        "max_batch_size",
        "shapes",
        "tolerance",
        "preferred_batch_sizes",
        "calibration",
        "",
    ]
) | st.text(alphabet=st.characters(codec="ascii", exclude_characters='"\r\n'), max_size=8)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(st.sampled_from(["fuzzboundary", "a", "x" * 70]))
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(FIELD_NAMES)
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            filename = draw(
                st.text(alphabet=st.characters(codec="ascii", exclude_characters='"\r\n'), max_size=8)
            )
            disposition += f'; filename="{filename}"'
        if draw(st.integers(0, 9)) == 0:
            disposition = draw(
                st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)
            )
        content = draw(
            st.binary(max_size=200)
            | st.sampled_from([b"fuzzed", b"int8", b"fp32", b"synthetic", b"0", b"[1,2]", b'{"x": 1}'])
        )
        parts.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode("latin-1")
            + content
            + b"\r\n"
        )
    body = b"".join(parts)
    if draw(st.integers(0, 5)):
        body += f"--{boundary}--\r\n".encode()
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}",
                f"multipart/form-data; boundary={boundary}",
                "multipart/form-data",
                f"multipart/form-data; boundary=other{boundary}",
                "application/json",
                "",
            ]
        )
    )
    return body, content_type


@FUZZ
@given(case=multipart_bodies())
def test_upload_random_multipart(
    client: TestClient, request: pytest.FixtureRequest, store: Path, case: Any
) -> None:
    count(request)
    body, content_type = case
    response = client.post("/engines", content=body, headers={"Content-Type": content_type})
    assert_answer(response, kserve=False)
    assert response.status_code != 202, response.text  # no valid model was ever sent
    assert list((store / "tmp").iterdir()) == []


def int8_upload(model: bytes, boundary: str = "fuzzfuzzfuzz") -> bytes:
    """A form whose model is validated fully; with precision=int8 and no
    calibration even a valid model ends in a 400, so no build starts."""
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="precision"\r\n\r\nint8\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nfuzzed\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
        ).encode()
        + model
        + f"\r\n--{boundary}--\r\n".encode()
    )


MULTIPART = "multipart/form-data; boundary=fuzzfuzzfuzz"


@FUZZ
@given(data=st.data())
def test_upload_mutated_multipart(
    client: TestClient,
    request: pytest.FixtureRequest,
    store: Path,
    model_files: dict[str, Path],
    data: st.DataObject,
) -> None:
    count(request)
    body = data.draw(mutated(int8_upload(model_files["mlp"].read_bytes())))
    response = client.post("/engines", content=body, headers={"Content-Type": MULTIPART})
    assert_answer(response, kserve=False)
    if response.status_code == 202:  # the mutation left a valid upload: let its build finish
        wait_for_state(client, "fuzzed", response.json()["version"])
    assert list((store / "tmp").iterdir()) == []


@FUZZ
@given(model=st.binary(max_size=2000))
def test_upload_random_bytes_as_onnx(
    client: TestClient, request: pytest.FixtureRequest, model: bytes
) -> None:
    count(request)
    response = client.post("/engines", content=int8_upload(model), headers={"Content-Type": MULTIPART})
    assert_answer(response, kserve=False)
    assert response.status_code in (400, 422), response.text


@FUZZ
@given(data=st.data())
def test_upload_mutated_real_models(
    client: TestClient, request: pytest.FixtureRequest, model_files: dict[str, Path], data: st.DataObject
) -> None:
    count(request)
    name = data.draw(st.sampled_from(sorted(model_files)))
    model = data.draw(mutated(model_files[name].read_bytes(), max_edits=4))
    response = client.post("/engines", content=int8_upload(model), headers={"Content-Type": MULTIPART})
    assert_answer(response, kserve=False)
    assert response.status_code in (400, 422), response.text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-onnx") / "m.onnx"


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_load_model_raises_only_its_own_errors(
    request: pytest.FixtureRequest, model_files: dict[str, Path], scratch: Path, data: st.DataObject
) -> None:
    count(request)
    if data.draw(st.booleans()):
        model = data.draw(st.binary(max_size=4000))
    else:
        name = data.draw(st.sampled_from(sorted(model_files)))
        model = data.draw(mutated(model_files[name].read_bytes(), max_edits=6))
    path = scratch
    path.write_bytes(model)
    try:
        read_signature(load_model(path))
    except (InvalidModel, UnsupportedModel) as exc:
        assert exc.message


FIELD_VALUES = {
    "name": st.sampled_from(["ok", "", "a" * 65, "../x", "é"]),
    "precision": st.sampled_from(["fp32", "fp16", "int8", "auto", "fp8", ""]),
    "calibration": st.sampled_from(["synthetic", "real", ""]),
    "calibration_method": st.sampled_from(["minmax", "entropy", "percentile", "x"]),
    "tolerance": st.sampled_from(['{"max_abs": 0.1}', '{"max_abs": "x"}', "{", "[]", '{"nope": 1}', "null"]),
    "max_batch_size": st.sampled_from(["1", "8", "0", "-1", "4097", "x", "1e3", " 8 "]),
    "opt_batch_size": st.sampled_from(["1", "9", "0", "x"]),
    "max_queue_delay_ms": st.sampled_from(["0", "5.5", "-1", "1e9", "nan", "inf"]),
    "preferred_batch_sizes": st.sampled_from(["1,2", "[1, 2]", "[[1]]", "1,x", "[", "0", "9", ""]),
    "max_queue_size": st.sampled_from(["1", "0", "10000000"]),
    "timeout_ms": st.sampled_from(["1", "0", "-5", "nan"]),
    "instances": st.sampled_from(["1", "65", "0"]),
    "shapes": st.sampled_from(
        [
            '{"x": {"min": [1, 16], "opt": [4, 16], "max": [8, 16]}}',
            '{"x": {"min": [1]}}',
            '{"x": 1}',
            "[]",
            "{",
        ]
    ),
    "workspace_bytes": st.sampled_from(["1", "0", "-1"]),
    "optimization_level": st.sampled_from(["0", "5", "6"]),
    "colour": st.just("blue"),
}


@FUZZ
@given(
    fields=st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.just(None), max_size=8).flatmap(
        lambda chosen: st.fixed_dictionaries(
            {"name": FIELD_VALUES["name"], **{k: FIELD_VALUES[k] for k in chosen}}
        )
    ),
    calibration=st.sampled_from([None, "a" * 64]),
)
def test_upload_fields_raise_only_bad_request(
    request: pytest.FixtureRequest, fields: dict[str, str], calibration: str | None
) -> None:
    """The form fields behind POST /engines: every combination is options or a 400."""
    count(request)
    try:
        parsed = parse_upload_fields(fields)
        to_options(parsed, Settings(), calibration_sha256=calibration, validation_sha256=None)
    except BadRequest as exc:
        assert exc.message
