"""Precision transforms done on the ONNX graph: FP16 conversion and INT8 Q/DQ insertion.

TensorRT 11 takes precision from the graph (strong typing), and ONNX Runtime runs the
same graphs on the CPU, so both backends build from what this module writes:

- ``convert_fp16``: float tensors become float16; graph inputs and outputs stay
  float32 behind Cast nodes, so the engine's signature does not change.
- ``quantize_int8``: QuantizeLinear/DequantizeLinear pairs calibrated on samples
  around the weighted ops, in the form TensorRT's explicit quantization accepts: int8,
  symmetric (zero points 0), per-channel weights, per-tensor activations, biases left
  in float32. ONNX Runtime fuses the same pairs into int8 kernels; a model that only
  ONNX Runtime will run may take calibrated activation zero points instead, which it
  runs faster still.

Both run in a build child process. They write ``output_path`` atomically (a temp file
in the same directory, then ``os.replace``), load and run the result in ONNX Runtime
before returning, and raise ``BuildFailed`` naming the step that failed. On error no
file is left at ``output_path``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.calibration import iter_batches, sample_count
from engines.errors import BuildFailed, CalibrationError, UnsupportedModel
from engines.store import atomic_output
from engines.types import CalibrationMethod

log = logging.getLogger(__name__)

PER_CHANNEL_MIN_OPSET = 13
"""DequantizeLinear has an ``axis`` (per-channel scales) from opset 13 on. Below it, ORT
quantizes per-channel without complaint and the result fails to load."""

CALIBRATION_PASS_SAMPLES = 32
"""Samples per calibration pass. ORT's histogram calibrators hold every activation of a
pass until they bin it, so passes bound memory; histograms and min/max merge across
passes. A model with a dynamic batch axis runs each pass as one batch (the histogram
collector also needs equal-sized runs within a pass); others run it one sample at a time."""

TRT_QDQ_OPTIONS: dict[str, Any] = {
    # TensorRT accepts only zero points of 0 for activations and weights alike.
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    # An int32 bias DQ is not what TensorRT expects; it folds float biases itself.
    "QuantizeBias": False,
}

QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Ops whose inputs (and output) get symmetric Q/DQ: the weighted ops, where int8 pays.
TensorRT's guidance is to quantize the inputs of weighted ops and let it fuse the rest.
On the CPU, symmetric Q/DQ around everything ORT can quantize (pooling, Flatten,
Relu...) made a conv net slower: with a Relu between them ORT keeps a
dequantize-Relu-quantize chain, and runs the MaxPool after it in int8 NCHW with extra
layout Transposes. With calibrated zero points (``symmetric_activations=False``) ORT
drops the Relu and keeps the whole chain in int8, so that recipe quantizes every op
type ORT supports."""

_ORT_METHODS = {
    CalibrationMethod.MINMAX: "MinMax",
    CalibrationMethod.ENTROPY: "Entropy",
    CalibrationMethod.PERCENTILE: "Percentile",
}

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def convert_fp16(onnx_path: Path, output_path: Path) -> dict[str, Any]:
    """Convert a float32 model to float16, keeping float32 graph inputs and outputs.

    Uses onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)`` with
    its default op block list (ops that stay float32 behind Casts), drops the stale
    ``value_info`` the converter leaves, sorts the graph, checks it with
    ``onnx.checker`` and runs it once in ONNX Runtime on synthetic input.

    Returns a report: converter, ops and nodes kept in float32, Cast nodes added,
    initializer values the converter clamped into float16 range, sizes in bytes.
    Raises ``BuildFailed`` naming the failed step.
    """
    from onnxconverter_common import __version__ as converter_version
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    started = time.perf_counter()
    model = _load(onnx_path, "fp16")
    size_before = onnx_path.stat().st_size
    block_list = set(DEFAULT_OP_BLOCK_LIST)
    kept_fp32 = [node for node in model.graph.node if node.op_type in block_list]
    casts_before = sum(node.op_type == "Cast" for node in model.graph.node)
    clamped = _values_outside_fp16_range(model)
    model_types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}

    try:
        with warnings.catch_warnings():
            # One warning per clamped value; the report carries the count instead.
            warnings.simplefilter("ignore", UserWarning)
            converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # the converter raises bare ValueErrors and KeyErrors
        raise BuildFailed(f"fp16: the float16 conversion failed: {_short(exc)}") from exc
    # Shapes inferred before the conversion still say float32 and contradict the
    # converted nodes; ONNX Runtime refuses such graphs.
    del converted.graph.value_info[:]
    repaired = _restore_io_types(model_types, converted.graph)
    _sort_topologically(converted.graph)

    with atomic_output(output_path) as temp_path:
        _save(converted, temp_path, "fp16")
        _check(temp_path, "fp16")
        _smoke_run(temp_path, "fp16", feeds=None)

    return {
        "converter": f"onnxconverter-common {converter_version} convert_float_to_float16(keep_io_types=True)",
        "fp32_op_types": sorted({node.op_type for node in kept_fp32}),
        "fp32_nodes": [node.name or node.output[0] for node in kept_fp32],
        "cast_nodes_added": sum(node.op_type == "Cast" for node in converted.graph.node) - casts_before,
        "initializer_values_clamped": clamped,
        "io_types_restored": repaired,
        "size_before_bytes": size_before,
        "size_after_bytes": output_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }


def quantize_int8(
    onnx_path: Path,
    output_path: Path,
    samples: Mapping[str, np.ndarray],
    *,
    method: CalibrationMethod,
    per_channel: bool = True,
    symmetric_activations: bool = True,
) -> dict[str, Any]:
    """Insert int8 Q/DQ nodes calibrated on ``samples``, in TensorRT's explicit form.

    Steps: upgrade the opset to 13 when per-channel needs it; ``quant_pre_process``
    (symbolic shape inference, retried without it when it fails on the graph);
    calibrate on the samples with ``method`` (in passes of CALIBRATION_PASS_SAMPLES, each
    one batch when the model's first axis is a dynamic batch, else one sample at a time);
    insert Q/DQ around QUANTIZED_OP_TYPES with ``quantize_static`` (QDQ, QInt8/QInt8,
    symmetric, biases in float32); check every zero point is 0, run ``onnx.checker``,
    and run the model in ONNX Runtime on the first samples.

    ``symmetric_activations=False`` is for models only ONNX Runtime will run (TensorRT
    refuses them): activations get calibrated zero points, which lets ONNX Runtime fold
    a Relu or Clip into the preceding int8 convolution instead of dequantizing around
    it; every op type ORT can quantize is then quantized; weights stay symmetric.

    ``samples`` are keyed by input name with samples on axis 0, as ``load_samples``
    returns them. Returns a report: method, sample count, opsets, Q/DQ node counts,
    ``quantized_op_types`` (op types reading at least one int8 tensor through a
    DequantizeLinear, with counts), per-channel weight count, sizes, pre-processing
    mode. Raises ``CalibrationError`` when
    the samples do not fit the model's inputs, ``UnsupportedModel`` when nothing in the
    model can be quantized, ``BuildFailed`` for any other failed step.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    started = time.perf_counter()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = _load(onnx_path, "int8")
    count = _check_samples(model, samples)
    batch_size = _calibration_batch_size(model)
    opset_before = _opset(model)
    report: dict[str, Any] = {
        "method": str(method),
        "samples": count,
        "calibration_batch_size": batch_size,
        "per_channel": per_channel,
        "symmetric_activations": symmetric_activations,
        "opset_before": opset_before,
    }

    with (
        tempfile.TemporaryDirectory(prefix=".int8-", dir=output_path.parent) as workdir,
        atomic_output(output_path) as temp_path,
    ):
        work = Path(workdir)
        source = onnx_path
        if per_channel and opset_before < PER_CHANNEL_MIN_OPSET:
            source = work / "upgraded.onnx"
            _save(_upgrade_opset(model, PER_CHANNEL_MIN_OPSET), source, "int8")
        del model  # the quantizer reads from disk; do not hold a second copy

        prepared = work / "prepared.onnx"
        report["pre_process"] = _pre_process(source, prepared)

        tensor_ranges = work / "ranges.json"
        op_types = _op_types_to_quantize(symmetric_activations)
        _calibrate(prepared, samples, method, op_types, batch_size, work, tensor_ranges)
        try:
            quantize_static(
                str(prepared),
                str(temp_path),
                calibration_data_reader=None,
                calibration_cache_path=str(tensor_ranges),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=_ort_method(method),
                op_types_to_quantize=op_types,
                extra_options={
                    **TRT_QDQ_OPTIONS,
                    "ActivationSymmetric": symmetric_activations,
                },
            )
        except Exception as exc:  # ORT's quantizer raises whatever its helpers raise
            raise BuildFailed(f"int8: inserting Q/DQ nodes failed: {_short(exc)}") from exc

        quantized = _load(temp_path, "int8")
        report.update(_qdq_summary(quantized))
        if report["quantize_nodes"] == 0 and report["dequantize_nodes"] == 0:
            raise UnsupportedModel(
                "int8: the model has no operator that kiln quantizes "
                f"({', '.join(QUANTIZED_OP_TYPES)}); build it as fp16 or fp32"
            )
        _check_zero_points(quantized, activations_too=symmetric_activations)
        report["opset_after"] = _opset(quantized)
        del quantized
        _check(temp_path, "int8")
        first = next(iter_batches(samples, batch_size))
        _smoke_run(temp_path, "int8", feeds=first)

    report["size_before_bytes"] = onnx_path.stat().st_size
    report["size_after_bytes"] = output_path.stat().st_size
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


# -- INT8 steps ---------------------------------------------------------------------------


def _check_samples(model: onnx.ModelProto, samples: Mapping[str, np.ndarray]) -> int:
    names = _input_names(model)
    missing = [name for name in names if name not in samples]
    unknown = sorted(name for name in samples if name not in names)
    if missing or unknown:
        raise CalibrationError(
            f"calibration samples do not match the model's inputs "
            f"({', '.join(names)}): missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    count = sample_count(samples)
    if count < 1:
        raise CalibrationError("calibration data holds no samples")
    return count


def _calibration_batch_size(model: onnx.ModelProto) -> int:
    """Batch calibration runs only along a real batch axis: every input and output with a
    dynamic first dim. Otherwise feed one sample at a time, which keeps a fixed leading
    dim of 1 (see engines.calibration for the sample layout)."""
    initializers = {init.name for init in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    values += list(model.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return 1
    return CALIBRATION_PASS_SAMPLES


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises RuntimeError and C++ errors
        raise BuildFailed(
            f"int8: per-channel quantization needs opset {target}, and upgrading the model "
            f"from opset {_opset(model)} failed: {_short(exc)}"
        ) from exc
    # The converter leaves shapes of the old opset behind; quant_pre_process re-infers them.
    del upgraded.graph.value_info[:]
    return upgraded


def _pre_process(source: Path, prepared: Path) -> str:
    """Shape inference and basic graph optimization before quantization (ORT's advice).

    Symbolic shape inference fails on some real graphs (and needs sympy); ONNX shape
    inference alone is then enough for what the quantizer needs to know.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        return "symbolic shape inference"
    except Exception as first:
        log.info("int8: symbolic shape inference failed (%s); retrying without it", first)
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:
            raise BuildFailed(
                f"int8: preparing the model for quantization failed: {_short(exc)} "
                f"(after symbolic shape inference failed: {_short(first)})"
            ) from exc
        return f"onnx shape inference only (symbolic shape inference failed: {_short(first)})"


def _calibrate(
    prepared: Path,
    samples: Mapping[str, np.ndarray],
    method: CalibrationMethod,
    op_types: list[str],
    batch_size: int,
    workdir: Path,
    ranges_path: Path,
) -> None:
    """Run the calibration passes and save the tensor ranges for ``quantize_static``.

    Calibrating here rather than inside ``quantize_static`` bounds memory: ORT's
    histogram calibrators hold every activation of one ``collect_data`` call, so the
    samples go through in passes of CALIBRATION_PASS_SAMPLES (one ``collect_data`` each)
    and the histograms (or min/max) merge across passes.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    try:
        calibrator = create_calibrator(
            prepared,
            op_types,
            augmented_model_path=str(workdir / "augmented.onnx"),
            calibrate_method=_ort_method(method),
            providers=["CPUExecutionProvider"],
        )
        # ORT's calibrators print progress to stdout; keep the build's output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            for chunk in iter_batches(samples, CALIBRATION_PASS_SAMPLES):
                calibrator.collect_data(_SampleReader(chunk, batch_size))
            ranges = calibrator.compute_data()
        save_tensors_data(ranges, ranges_path)
    except Exception as exc:  # calibration runs the model: any runtime error can come out
        raise BuildFailed(f"int8: calibration ({method}) failed: {_short(exc)}") from exc


def _op_types_to_quantize(symmetric_activations: bool) -> list[str]:
    if symmetric_activations:
        return list(QUANTIZED_OP_TYPES)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # What quantize_static quantizes when given no op types.
    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def _ort_method(method: CalibrationMethod) -> Any:
    from onnxruntime.quantization import CalibrationMethod as OrtCalibrationMethod

    return OrtCalibrationMethod[_ORT_METHODS[CalibrationMethod(method)]]


class _SampleReader:
    """ORT's CalibrationDataReader protocol (``get_next`` → feeds or None) over samples."""

    def __init__(self, samples: Mapping[str, np.ndarray], batch_size: int) -> None:
        self._batches = iter_batches(samples, batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        # Contiguous copies: ORT would copy strided views anyway.
        return {name: np.ascontiguousarray(array) for name, array in batch.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (batch := self.get_next()) is not None:
            yield batch


def _qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    quantized_ops = Counter(
        node.op_type
        for node in graph.node
        if node.op_type not in _QDQ_OPS and any(name in dequantized for name in node.input)
    )
    per_channel_weights = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            scale = initializers.get(node.input[1])
            if scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
                per_channel_weights += 1
    return {
        "quantize_nodes": sum(node.op_type == "QuantizeLinear" for node in graph.node),
        "dequantize_nodes": sum(node.op_type == "DequantizeLinear" for node in graph.node),
        "quantized_op_types": dict(sorted(quantized_ops.items())),
        "per_channel_weights": per_channel_weights,
    }


def _check_zero_points(model: onnx.ModelProto, *, activations_too: bool) -> None:
    """TensorRT refuses any Q/DQ zero point other than 0 ("symmetric only").

    Weights (a DequantizeLinear of an initializer) are always checked; activations
    only when ``activations_too``."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in _QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in initializers
        if not (is_weight or activations_too):
            continue
        zero_point = initializers.get(node.input[2])
        if zero_point is None:
            raise BuildFailed(
                f"int8: the zero point of {node.op_type} '{node.name}' is computed at run "
                "time; TensorRT needs constant zero points of 0"
            )
        values = numpy_helper.to_array(zero_point)
        if values.dtype != np.int8 or np.any(values != 0):
            raise BuildFailed(
                f"int8: {node.op_type} '{node.name}' has a non-symmetric zero point "
                f"({values.dtype}, nonzero values present); TensorRT needs int8 zeros"
            )


# -- shared steps -------------------------------------------------------------------------


def _load(path: Path, step: str) -> onnx.ModelProto:
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BuildFailed(f"{step}: cannot read the model {path.name}: {_short(exc)}") from exc


def _save(model: onnx.ModelProto, path: Path, step: str) -> None:
    try:
        onnx.save(model, path)
    except Exception as exc:  # ValueError past 2 GiB, OSError on a full disk
        raise BuildFailed(f"{step}: cannot write the converted model: {_short(exc)}") from exc


def _check(path: Path, step: str) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError and friends
        raise BuildFailed(f"{step}: the converted model fails onnx.checker: {_short(exc)}") from exc


def _smoke_run(path: Path, step: str, *, feeds: Mapping[str, np.ndarray] | None) -> None:
    """Load ``path`` in ONNX Runtime and run it once: converters can write graphs that
    pass the checker yet fail to load (a DequantizeLinear axis below opset 13, stale
    types after FP16 conversion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise BuildFailed(
            f"{step}: the converted model does not load in ONNX Runtime: {_short(exc)}"
        ) from exc
    if feeds is None:
        feeds = _synthetic_feeds(session)
    try:
        outputs = session.run(None, dict(feeds))
    except Exception as exc:  # as above, at run time
        raise BuildFailed(f"{step}: the converted model fails to run in ONNX Runtime: {_short(exc)}") from exc
    if not outputs:
        raise BuildFailed(f"{step}: the converted model produced no outputs")


def _synthetic_feeds(session: Any) -> dict[str, np.ndarray]:
    """One small input per session input, from ORT's own view of the inputs (dynamic
    dims become 1; integers are zeros, a valid index anywhere)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in value.shape]
        dtype = _ORT_TYPES.get(value.type)
        if dtype is None:
            raise UnsupportedModel(f"input '{value.name}' has type {value.type}")
        if np.dtype(dtype).kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype=dtype)
    return feeds


_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _restore_io_types(original: Mapping[str, int], graph: onnx.GraphProto) -> list[str]:
    """Put back graph input and output types the converter changed, behind Casts.

    ``keep_io_types`` misses outputs produced by a block-listed op (a TopK feeding a
    graph output comes back float16), which would change the engine's signature.
    Returns the names that needed a Cast.
    """
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {init.name for init in graph.initializer}

    def fresh(name: str) -> str:
        candidate, index = f"{name}_fp16", 0
        while candidate in taken:
            index += 1
            candidate = f"{name}_fp16_{index}"
        taken.add(candidate)
        return candidate

    def rename(old: str, new: str, *, inputs: bool, outputs: bool) -> None:
        for node in graph.node:
            if inputs:
                node.input[:] = [new if name == old else name for name in node.input]
            if outputs:
                node.output[:] = [new if name == old else name for name in node.output]

    repaired = []
    for value in graph.output:
        tensor_type = value.type.tensor_type
        wanted = original.get(value.name, tensor_type.elem_type)
        if tensor_type.elem_type == wanted:
            continue
        internal = fresh(value.name)
        rename(value.name, internal, inputs=True, outputs=True)
        graph.node.append(onnx.helper.make_node("Cast", [internal], [value.name], to=wanted))
        tensor_type.elem_type = wanted
        repaired.append(value.name)
    for value in graph.input:
        tensor_type = value.type.tensor_type
        wanted = original.get(value.name, tensor_type.elem_type)
        if tensor_type.elem_type == wanted:
            continue
        internal = fresh(value.name)
        rename(value.name, internal, inputs=True, outputs=False)
        cast = onnx.helper.make_node("Cast", [value.name], [internal], to=tensor_type.elem_type)
        graph.node.insert(0, cast)
        tensor_type.elem_type = wanted
        repaired.append(value.name)
    return repaired


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (stable otherwise).

    Names used inside a node's subgraphs count as its inputs, since a subgraph may read
    outer-scope values. A graph with a cycle is left as it is for the checker to report.
    """
    nodes = list(graph.node)
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    depends_on: list[set[int]] = []
    for index, node in enumerate(nodes):
        names = set(node.input) | _subgraph_inputs(node)
        depends_on.append({producer[n] for n in names if n in producer and producer[n] != index})
    ordered: list[int] = []
    placed: set[int] = set()
    remaining = list(range(len(nodes)))
    while remaining:
        ready = [i for i in remaining if depends_on[i] <= placed]
        if not ready:
            return
        ordered.extend(ready)
        placed.update(ready)
        remaining = [i for i in remaining if i not in placed]
    if ordered != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in ordered)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = list(attribute.graphs)
        if attribute.HasField("g"):
            graphs.append(attribute.g)
        for subgraph in graphs:
            for inner in subgraph.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def _values_outside_fp16_range(model: onnx.ModelProto) -> int:
    """Float32 initializer values the converter will clamp (|v| > 1e4 or 0 < |v| < 1e-7)."""
    from onnx import numpy_helper

    count = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        values = np.abs(numpy_helper.to_array(init))
        count += int(np.count_nonzero((values > 1e4) | ((values > 0) & (values < 1e-7))))
    return count


def _input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def _opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 0


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["convert_fp16", "quantize_int8"]
