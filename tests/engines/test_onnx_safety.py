"""``load_model`` as a gate: external data never leaves the upload, undecodable
files are ``InvalidModel``, and graphs that would allocate a huge tensor from
constant shapes are refused with the node that asks for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.errors import InvalidModel, UnsupportedModel
from engines.onnx_model import DEFAULT_MAX_STATIC_ELEMENTS, check_static_sizes, load_model

HUGE = [100_000, 100_000]  # 10^10 elements: 40 GB of float32


def save(
    path: Path,
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto] | None = None,
    *,
    opset: int = 17,
    rank: int = 2,
    dtype: int = TensorProto.FLOAT,
) -> Path:
    """x[batch, 4] -> y = x, plus the nodes under test, whose output "c" (of
    ``rank`` symbolic dims) is a graph output."""
    graph = helper.make_graph(
        [*nodes, helper.make_node("Identity", ["x"], ["y"], name="identity")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("c", dtype, [f"c{i}" for i in range(rank)]),
        ],
        initializer=initializers or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def ints(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def external(tensor: TensorProto, location: str) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


# -- external data ------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the upload that a model must never get to read."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    return secret


def test_external_initializer_is_refused(tmp_path: Path, outside: Path) -> None:
    weights = external(numpy_helper.from_array(np.zeros(16, np.float32), "w"), "../outside/secret.bin")
    path = save(tmp_path / "m.onnx", [helper.make_node("Identity", ["w"], ["c"])], [weights])
    with pytest.raises(
        InvalidModel, match=r"tensor 'w' keeps its data in an external file '\.\./outside/secret\.bin'"
    ):
        load_model(path)


def test_external_tensor_in_a_constant_node_is_refused(tmp_path: Path, outside: Path) -> None:
    value = external(numpy_helper.from_array(np.zeros(16, np.float32), "v"), str(outside))
    node = helper.make_node("Constant", [], ["c"], value=value)
    with pytest.raises(InvalidModel, match="external file"):
        load_model(save(tmp_path / "m.onnx", [node]))


def test_external_sparse_indices_are_refused(tmp_path: Path, outside: Path) -> None:
    values = numpy_helper.from_array(np.ones(2, np.float32), "sv")
    indices = external(numpy_helper.from_array(np.array([0, 3], np.int64), "si"), str(outside))
    sparse = helper.make_sparse_tensor(values, indices, [4])
    node = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
    with pytest.raises(InvalidModel, match="tensor 'si' keeps its data in an external file"):
        load_model(save(tmp_path / "m.onnx", [node]))


def test_external_sparse_initializer_indices_are_refused(tmp_path: Path, outside: Path) -> None:
    values = numpy_helper.from_array(np.ones(2, np.float32), "w")
    indices = external(numpy_helper.from_array(np.array([0, 3], np.int64), "wi"), str(outside))
    path = save(tmp_path / "m.onnx", [helper.make_node("Identity", ["w"], ["c"])])
    model = onnx.load_model(str(path))
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidModel, match="tensor 'wi' keeps its data in an external file"):
        load_model(path)


def test_external_data_inside_a_subgraph_is_refused(tmp_path: Path, outside: Path) -> None:
    value = external(numpy_helper.from_array(np.zeros(4, np.float32), "deep"), str(outside))
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value=value)],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)
    with pytest.raises(InvalidModel, match="tensor 'deep' keeps its data in an external file"):
        load_model(save(tmp_path / "m.onnx", [node], [cond]))


# -- files that are not models ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (b"", InvalidModel, "the model file is empty"),
        (b"\xff\xfe\xfd" * 50, InvalidModel, "not an ONNX model"),
        (b"\x0a\xff\xff\xff\xff\x0f", InvalidModel, "not an ONNX model"),
        (b"\x08\x08", InvalidModel, "holds no graph"),  # a valid ModelProto with ir_version only
        (b"PK\x03\x04" + b"\0" * 60, InvalidModel, "not an ONNX model"),
    ],
    ids=["empty", "garbage", "length-overflow", "no-graph", "zip"],
)
def test_undecodable_files_are_invalid_models(
    tmp_path: Path, content: bytes, error: type[Exception], match: str
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(error, match=match):
        load_model(path)


def test_size_limit(tmp_path: Path, model_files: dict[str, Path]) -> None:
    size = model_files["mlp"].stat().st_size
    with pytest.raises(
        InvalidModel, match=f"the model's graph file is {size} bytes; the limit is {size - 1} bytes"
    ):
        load_model(model_files["mlp"], max_bytes=size - 1)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_models_are_invalid(tmp_path: Path, model_files: dict[str, Path], keep: float) -> None:
    data = model_files["cnn"].read_bytes()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InvalidModel):
        load_model(path)


def test_initializer_dims_larger_than_its_data_are_invalid(tmp_path: Path) -> None:
    weights = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=HUGE, raw_data=b"\0" * 16)
    path = save(tmp_path / "m.onnx", [helper.make_node("Identity", ["w"], ["c"])], [weights])
    with pytest.raises(InvalidModel, match=r"raw_data size .* too small for the declared shape"):
        load_model(path)


# -- tensors sized from constant shapes ------------------------------------------------------


def constant_shape(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=ints(name + "_v", values))


def refused(path: Path, op: str, elements: int) -> None:
    with pytest.raises(
        UnsupportedModel,
        match=rf"\({op}\) would create a tensor of at least {elements} elements from constant shapes; "
        rf"kiln refuses graphs that need more than {DEFAULT_MAX_STATIC_ELEMENTS} elements",
    ):
        load_model(path)


def test_constant_of_shape_from_an_initializer(tmp_path: Path) -> None:
    node = helper.make_node("ConstantOfShape", ["s"], ["c"], name="zeros")
    path = save(tmp_path / "m.onnx", [node], [ints("s", HUGE)])
    with pytest.raises(UnsupportedModel, match="node 'zeros' \\(ConstantOfShape\\)"):
        load_model(path)


def test_constant_of_shape_from_a_constant_node(tmp_path: Path) -> None:
    nodes = [constant_shape("s", HUGE), helper.make_node("ConstantOfShape", ["s"], ["c"])]
    refused(save(tmp_path / "m.onnx", nodes), "ConstantOfShape", 10**10)


def test_constant_of_shape_from_value_ints(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Constant", [], ["s"], value_ints=[50_000, 50_000, 4]),
        helper.make_node("ConstantOfShape", ["s"], ["c"]),
    ]
    refused(save(tmp_path / "m.onnx", nodes, rank=3), "ConstantOfShape", 10**10)


def test_expand_to_a_huge_constant_shape(tmp_path: Path) -> None:
    # Expand of the input itself: nothing is folded at load, the first request allocates.
    node = helper.make_node("Expand", ["x", "s"], ["c"])
    path = save(tmp_path / "m.onnx", [node], [ints("s", [*HUGE, 4])], rank=3)
    refused(path, "Expand", 4 * 10**10)


def test_tile_with_huge_repeats(tmp_path: Path) -> None:
    node = helper.make_node("Tile", ["x", "r"], ["c"])
    refused(save(tmp_path / "m.onnx", [node], [ints("r", HUGE)]), "Tile", 10**10)


def test_random_normal_with_a_huge_shape(tmp_path: Path) -> None:
    node = helper.make_node("RandomNormal", [], ["c"], shape=HUGE)
    refused(save(tmp_path / "m.onnx", [node]), "RandomNormal", 10**10)


def test_range_with_a_huge_count(tmp_path: Path) -> None:
    node = helper.make_node("Range", ["start", "limit", "delta"], ["c"])
    path = save(
        tmp_path / "m.onnx",
        [node],
        [ints("start", [0]), ints("limit", [10**12]), ints("delta", [1])],
        rank=1,
        dtype=TensorProto.INT64,
    )
    # Range takes scalars; the check reads the same values from 1-element tensors.
    model = onnx.load_model(str(path))
    for init in model.graph.initializer:
        init.ClearField("dims")
    onnx.save_model(model, str(path))
    refused(path, "Range", 10**12)


def test_pad_with_huge_constant_pads(tmp_path: Path) -> None:
    node = helper.make_node("Pad", ["x", "pads"], ["c"])
    refused(save(tmp_path / "m.onnx", [node], [ints("pads", [0, 0, 100_000, 100_000])]), "Pad", 100_001**2)


def test_pad_attribute_in_an_old_opset(tmp_path: Path) -> None:
    node = helper.make_node("Pad", ["x"], ["c"], pads=[10**6, 0, 10**6, 0])
    path = save(tmp_path / "m.onnx", [node], opset=10)
    with pytest.raises(UnsupportedModel, match=r"\(Pad\) would create a tensor of at least 2000001"):
        load_model(path, max_static_elements=10**6)


def test_resize_to_huge_sizes(tmp_path: Path) -> None:
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["c"])
    refused(save(tmp_path / "m.onnx", [node], [ints("sizes", HUGE)]), "Resize", 10**10)


def test_a_huge_tensor_inside_a_subgraph(tmp_path: Path) -> None:
    branch = helper.make_graph(
        [constant_shape("inner", HUGE), helper.make_node("ConstantOfShape", ["inner"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["b0", "b1"])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)
    refused(save(tmp_path / "m.onnx", [node], [cond]), "ConstantOfShape", 10**10)


def test_the_limit_is_a_parameter(tmp_path: Path) -> None:
    node = helper.make_node("ConstantOfShape", ["s"], ["c"])
    path = save(tmp_path / "m.onnx", [node], [ints("s", [1000, 1000])])
    assert load_model(path).graph.node  # 10^6 elements: well under the default
    with pytest.raises(UnsupportedModel, match="at least 1000000 elements"):
        load_model(path, max_static_elements=999_999)
    load_model(path, max_static_elements=1_000_000)


def test_shapes_computed_at_run_time_are_not_guessed(tmp_path: Path) -> None:
    # The shape comes from the input: nothing static to judge, so the model passes.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["c"]),
    ]
    assert load_model(save(tmp_path / "m.onnx", nodes)).graph.node


def test_every_test_model_passes(model_files: dict[str, Path]) -> None:
    for path in model_files.values():
        check_static_sizes(load_model(path))
