"""Loading an uploaded ONNX model safely and reading its signature.

``load_model`` is the gate every upload passes before anything builds on it:
size limit, protobuf decode, external data confined to the model's own package
(see ``check_external_data``), opset range, ``onnx.checker`` with full shape
inference, and a static check that no node creates a tensor from constant
shapes too large to allocate (a few bytes of ``ConstantOfShape`` or ``Expand``
can ask for terabytes at load or at the first request). The graph is read
without its external data, so a model above protobuf's 2 GB limit is checked
without ever being held as one message.
``read_signature`` turns the graph's inputs and outputs into ``TensorSpec``
values and decides whether requests can be batched.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from engines.errors import InvalidModel, UnsupportedModel
from engines.types import DYNAMIC, Signature, TensorSpec

MIN_OPSET = 7
"""The oldest default-domain opset ONNX Runtime still loads."""

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3 - 1
"""protobuf cannot parse a message of 2 GiB or more: larger models keep their
weights in external data files."""

EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum"})
"""The keys of a tensor's ``external_data`` that the ONNX spec defines."""

DEFAULT_MAX_STATIC_ELEMENTS = 1 << 28
"""The most elements a node may create from constant shapes (1 GiB of float32).

Initializers are not concerned: their data is in the file, whose size is limited."""


def max_supported_opset() -> int:
    """The newest default-domain opset the installed onnx package knows."""
    return int(onnx.defs.onnx_opset_version())


def load_model(
    path: Path,
    *,
    external_data: bool = False,
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_static_elements: int = DEFAULT_MAX_STATIC_ELEMENTS,
) -> onnx.ModelProto:
    """Parse and check an ONNX file. Raises ``InvalidModel`` or ``UnsupportedModel``.

    With ``external_data``, the file's directory is its package (it holds this
    model's files and nothing else) and external references must resolve to files
    in it; without, any external reference is refused. The returned graph's
    external tensors are not loaded."""
    size = path.stat().st_size
    max_bytes = min(max_bytes, DEFAULT_MAX_MODEL_BYTES)
    if size == 0:
        raise InvalidModel("the model file is empty")
    if size > max_bytes:
        advice = (
            " (protobuf's limit: save the weights as external data, "
            "onnx.save_model(..., save_as_external_data=True), and send them with the graph)"
            if max_bytes == DEFAULT_MAX_MODEL_BYTES
            else ""
        )
        raise InvalidModel(f"the model's graph file is {size} bytes; the limit is {max_bytes} bytes{advice}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidModel(f"the file is not an ONNX model: {_short(exc)}") from exc
    if not model.graph.node and not model.graph.output:
        raise InvalidModel("the file is not an ONNX model: it holds no graph")
    check_external_data(model, path.parent if external_data else None)
    _check_opset(model)
    try:
        # Given the path, the checker resolves external data in the model's folder
        # (given the message, it would look in the working directory).
        onnx.checker.check_model(str(path) if external_data else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModel(f"the ONNX checker rejected the model: {_short(exc)}") from exc
    except (ValueError, RuntimeError) as exc:
        raise InvalidModel(f"the ONNX checker rejected the model: {_short(exc)}") from exc
    check_static_sizes(model, max_static_elements)
    return model


def _short(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _tensors_with_data(model: onnx.ModelProto) -> list[TensorProto]:
    tensors: list[TensorProto] = []

    def sparse_parts(sparse: onnx.SparseTensorProto) -> list[TensorProto]:
        return [sparse.values, sparse.indices]

    def visit(graph: onnx.GraphProto) -> None:
        tensors.extend(graph.initializer)
        for sparse in graph.sparse_initializer:
            tensors.extend(sparse_parts(sparse))
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("sparse_tensor"):
                    tensors.extend(sparse_parts(attr.sparse_tensor))
                for sparse in attr.sparse_tensors:
                    tensors.extend(sparse_parts(sparse))
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return tensors


def external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Every tensor of the model (subgraphs included) whose data is in an external file."""
    return [t for t in _tensors_with_data(model) if t.data_location == TensorProto.EXTERNAL]


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The data files the model names, as normalised relative paths (after
    ``check_external_data`` has passed)."""
    return {confined_path(_external_info(t)["location"], "location") for t in external_tensors(model)}


def external_data_bytes(model: onnx.ModelProto) -> int:
    """How many bytes of tensor data the model keeps in external files."""
    total = 0
    for tensor in external_tensors(model):
        length = _external_info(tensor).get("length")
        total += int(length) if length is not None and length.isdigit() else _byte_size(tensor) or 0
    return total


def confined_path(name: str, what: str) -> str:
    """``name`` as a normalised relative POSIX path that cannot leave its directory.

    Refuses absolute paths, drive letters, backslashes, NUL bytes and ``..``: the
    ONNX external-data path traversal class (CVE-2022-25882, CVE-2024-27318).
    ``what`` names the value in the message. Raises ``InvalidModel``."""
    problem = None
    if not name:
        problem = "is empty"
    elif "\0" in name:
        problem = "contains a NUL byte"
    elif "\\" in name:
        problem = "contains a backslash (paths use '/')"
    elif name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        problem = "is an absolute path"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if problem is None and ".." in parts:
        problem = "climbs out of its directory with '..'"
    if problem is None and not parts:
        problem = "names no file"
    if problem is not None:
        raise InvalidModel(
            f"{what} '{name[:200]}' {problem}; every file of a model must lie beside its "
            "graph or in a folder below it"
        )
    return "/".join(parts)


def _external_info(tensor: TensorProto) -> dict[str, str]:
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_DATA_KEYS:
            raise InvalidModel(
                f"tensor '{tensor.name}' has an unknown external data key '{entry.key[:100]}'; "
                f"ONNX defines only {', '.join(sorted(EXTERNAL_DATA_KEYS))}"
            )
        if entry.key in info:
            raise InvalidModel(f"tensor '{tensor.name}' names its external '{entry.key}' twice")
        info[entry.key] = entry.value
    if "location" not in info:
        raise InvalidModel(f"tensor '{tensor.name}' keeps its data externally but names no file")
    return info


def check_external_data(model: onnx.ModelProto, package: Path | None) -> None:
    """Every external reference stays inside ``package`` and fits the file it names.

    Without a package (a model sent as one file) any external reference is refused,
    saying which file to send with it. With one, each location must be a confined
    relative path (``confined_path``) to a regular file in the package, reached
    without symbolic links and with one hard link only, and its offset and length
    must lie inside that file and match the tensor's size. Raises ``InvalidModel``."""
    tensors = external_tensors(model)
    if tensors and package is None:
        location = _external_info(tensors[0]).get("location", "?")
        raise InvalidModel(
            f"tensor '{tensors[0].name}' keeps its data in an external file '{location[:200]}', "
            "which was not sent: send the data files with the graph (a 'model_data' file part "
            "per file, named as the graph names it) or the graph and its data in one .zip, "
            ".tar or .tar.gz archive"
        )
    if package is None:
        return
    root = package.resolve()
    sizes: dict[str, int] = {}
    for tensor in tensors:
        info = _external_info(tensor)
        location = confined_path(info["location"], f"tensor '{tensor.name}': the data location")
        if location not in sizes:
            sizes[location] = _data_file_size(root, location, tensor.name)
        _check_extent(tensor, info, sizes[location], location)


def _data_file_size(root: Path, location: str, tensor_name: str) -> int:
    """The size of a package's data file, refusing links, special files and escapes."""
    path = root
    for part in location.split("/"):
        path = path / part
        try:
            mode = path.lstat()
        except FileNotFoundError:
            raise InvalidModel(
                f"tensor '{tensor_name}' keeps its data in '{location}', which is not in the "
                "upload: send that file with the graph (a 'model_data' file part named as the "
                "graph names it, or the graph and its data files in one .zip, .tar or .tar.gz archive)"
            ) from None
        if stat.S_ISLNK(mode.st_mode):
            raise InvalidModel(f"'{location}' (data of tensor '{tensor_name}') is a symbolic link")
    if not stat.S_ISREG(mode.st_mode):
        raise InvalidModel(f"'{location}' (data of tensor '{tensor_name}') is not a regular file")
    if mode.st_nlink > 1:
        raise InvalidModel(f"'{location}' (data of tensor '{tensor_name}') has several hard links")
    if not path.resolve().is_relative_to(root):
        raise InvalidModel(f"'{location}' (data of tensor '{tensor_name}') lies outside the upload")
    return int(mode.st_size)


def _check_extent(tensor: TensorProto, info: dict[str, str], file_size: int, location: str) -> None:
    def number(key: str, default: int) -> int:
        text = info.get(key)
        if text is None:
            return default
        if not text.isdigit() or len(text) > 20:
            raise InvalidModel(
                f"tensor '{tensor.name}' has an external {key} '{text[:40]}' that is not a size"
            )
        return int(text)

    offset = number("offset", 0)
    length = number("length", max(file_size - offset, 0))
    if offset + length > file_size:
        raise InvalidModel(
            f"tensor '{tensor.name}' reads bytes {offset} to {offset + length} of '{location}', "
            f"which has {file_size} bytes"
        )
    expected = _byte_size(tensor)
    if expected is not None and expected != length:
        raise InvalidModel(
            f"tensor '{tensor.name}' of shape {list(tensor.dims)} needs {expected} bytes but "
            f"its external data in '{location}' is {length} bytes long"
        )


_UNSIZED_TYPES = frozenset({"STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2"})
"""Element types whose raw size is not elements x item size (strings, packed sub-byte)."""


def _byte_size(tensor: TensorProto) -> int | None:
    """The raw bytes a tensor holds; None where the element type does not fix it."""
    try:
        if TensorProto.DataType.Name(tensor.data_type) in _UNSIZED_TYPES:
            return None
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return _product(list(tensor.dims)) * itemsize


_CONSTANT_VALUE_LIMIT = 64
"""Constant tensors longer than this are not shapes: they are not read."""


def _int_values(tensor: TensorProto) -> list[int] | None:
    if tensor.data_type not in (TensorProto.INT64, TensorProto.INT32):
        return None
    if tensor.data_location == TensorProto.EXTERNAL:
        return None
    if _product(list(tensor.dims)) > _CONSTANT_VALUE_LIMIT:
        return None
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError):
        return None
    return [int(v) for v in array.reshape(-1)]


def _scope_constants(graph: onnx.GraphProto, outer: dict[str, list[int]]) -> dict[str, list[int]]:
    """Small integer constants a node of ``graph`` can read: those of the graphs
    around it, then this graph's initializers and ``Constant`` outputs (a name
    bound here hides the outer one)."""
    values = dict(outer)
    initializers = {init.name for init in graph.initializer}
    for value in graph.input:  # a subgraph's inputs (a Loop body's) hide outer names
        if value.name not in initializers:
            values.pop(value.name, None)

    def bind(name: str, ints: list[int] | None) -> None:
        if ints is None:
            values.pop(name, None)
        else:
            values[name] = ints

    for init in graph.initializer:
        bind(init.name, _int_values(init))
    for node in graph.node:
        for output in node.output:
            values.pop(output, None)
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                bind(node.output[0], _int_values(attr.t))
            elif attr.name == "value_ints":
                ints = list(attr.ints)
                bind(node.output[0], ints if len(ints) <= _CONSTANT_VALUE_LIMIT else None)
            elif attr.name == "value_int":
                bind(node.output[0], [int(attr.i)])
    return values


def _product(dims: list[int]) -> int:
    result = 1
    for dim in dims:
        result *= max(int(dim), 0)
    return result


def _static_elements(node: onnx.NodeProto, constants: dict[str, list[int]]) -> int | None:
    """A lower bound on the elements ``node`` creates, from its constant inputs and
    attributes alone; None when nothing is known."""

    def const(index: int) -> list[int] | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return constants.get(node.input[index])

    op = node.op_type
    if op in ("ConstantOfShape", "Expand"):  # the output has at least this shape
        shape = const(0 if op == "ConstantOfShape" else 1)
        return None if shape is None else _product(shape)
    if op == "Tile":  # each input element repeats prod(repeats) times
        repeats = const(1)
        return None if repeats is None else _product(repeats)
    if op in ("RandomNormal", "RandomUniform"):
        shape = next((list(a.ints) for a in node.attribute if a.name == "shape"), None)
        return None if shape is None else _product(shape)
    if op == "Range":
        start, limit, delta = const(0), const(1), const(2)
        if not (start and limit and delta) or delta[0] == 0:
            return None
        return max(0, -(-(limit[0] - start[0]) // delta[0]))
    if op == "Pad":  # every padded axis is at least pad_begin + pad_end + 1 long
        pads = const(1) or next((list(a.ints) for a in node.attribute if a.name == "pads"), None)
        if not pads or len(pads) % 2:
            return None
        rank = len(pads) // 2
        return _product([1 + max(pads[i], 0) + max(pads[i + rank], 0) for i in range(rank)])
    if op == "Resize":  # explicit output sizes
        sizes = const(3)
        return None if not sizes else _product(sizes)
    return None


def check_static_sizes(model: onnx.ModelProto, max_elements: int = DEFAULT_MAX_STATIC_ELEMENTS) -> None:
    """Refuse graphs that would allocate a huge tensor from constant shapes.

    A conservative static check: only shapes, repeats, pads and ranges that are
    constants in the file are read, and the figure compared with ``max_elements``
    is a lower bound of what the node creates. Subgraphs (If, Loop, Scan) are
    checked with the constants they can see. Raises ``UnsupportedModel``."""

    def visit(graph: onnx.GraphProto, outer: dict[str, list[int]]) -> None:
        constants = _scope_constants(graph, outer)
        for node in graph.node:
            if node.domain in ("", "ai.onnx"):
                elements = _static_elements(node, constants)
                if elements is not None and elements > max_elements:
                    label = node.name or (node.output[0] if node.output else "?")
                    raise UnsupportedModel(
                        f"node '{label}' ({node.op_type}) would create a tensor of at least "
                        f"{elements} elements from constant shapes; kiln refuses graphs that "
                        f"need more than {max_elements} elements in one tensor (they would "
                        "exhaust memory)"
                    )
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g, constants)
                for sub in attr.graphs:
                    visit(sub, constants)

    visit(model.graph, {})


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
