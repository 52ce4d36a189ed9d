"""Precision transforms done on the ONNX graph: FP16 conversion and INT8 Q/DQ insertion.

TensorRT 11 takes precision from the graph (strong typing), and ONNX Runtime runs the
same graphs on the CPU, so both backends build from what this module writes:

- ``convert_fp16``: float tensors become float16; graph inputs and outputs stay
  float32 behind Cast nodes, so the engine's signature does not change.
- ``quantize_int8``: QuantizeLinear/DequantizeLinear pairs calibrated on samples
  around the weighted ops. For TensorRT, in the form its explicit quantization
  accepts: int8, symmetric (zero points 0), per-channel weights, per-tensor
  activations, biases left in float32. For ONNX Runtime, uint8 activations with
  calibrated zero points, which it fuses into its fastest int8 kernels.

Both take the names of nodes to leave alone (``keep_fp32``, ``exclude_nodes``) and the
int8 calibration method, so a caller can repair a precision loss node by node.

Both run in a build child process. They write ``output_path`` atomically (a temp file
in the same directory, then ``os.replace``), load and run the result in ONNX Runtime
before returning, and raise ``BuildFailed`` naming the step that failed. On error no
file is left at ``output_path``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from engines.calibration import iter_batches, sample_count
from engines.errors import BuildFailed, CalibrationError, UnsupportedModel
from engines.store import atomic_output
from engines.types import CalibrationMethod, Signature

if TYPE_CHECKING:
    from engines.int8_calibration import Int8Calibration

log = logging.getLogger(__name__)

TRT_QDQ_OPTIONS: dict[str, Any] = {
    # TensorRT accepts only zero points of 0 for activations and weights alike.
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    # An int32 bias DQ is not what TensorRT expects; it folds float biases itself.
    "QuantizeBias": False,
}

QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The weighted ops, where int8 pays. For TensorRT only their inputs get Q/DQ (NVIDIA's
recipe; TensorRT fuses the rest). On this CPU, quantizing the ops between them
too (Relu, Add, Mul, Sigmoid, pooling, Concat) was slower: with uint8 activations on
one thread, YOLOv8n ran 2.3x FP32's speed (1.7x with those ops quantized) and a Relu
conv net 5.3x (2.3x)."""

_ORT_METHODS = {
    CalibrationMethod.MINMAX: "MinMax",
    CalibrationMethod.ENTROPY: "Entropy",
    CalibrationMethod.PERCENTILE: "Percentile",
}

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


FP16_EXTRA_BLOCKED_OPS = ("ArgMax", "ArgMin", "Resize", "NonZero", "Einsum")
"""Ops kept in float32 besides the converter's defaults (the ``ai.onnx.ml`` ops, TopK,
Range, CumSum, NonMaxSuppression...): index results (ArgMax/ArgMin, NonZero) should not
turn on float16 rounding, Resize's scales must be float32, and ONNX Runtime's CPU has no
float16 Einsum."""

RECURRENT_OPS = ("GRU", "LSTM", "RNN")
"""In a main graph with one of these, the recurrent ops, their direct neighbours and the
Transposes stay float32: torch's float16 Transposes around a GRU crash ONNX Runtime
1.32's full graph optimization (a segmentation fault at session creation). Only by node
name, in the main graph: blocking them inside an If or Loop body makes the converter put
their Casts in the outer graph, before the values exist."""


def convert_fp16(
    onnx_path: Path,
    output_path: Path,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    keep_fp32: Collection[str] = (),
) -> dict[str, Any]:
    """Convert a float32 model to float16, keeping float32 graph inputs and outputs.

    Uses ONNX Runtime's ``transformers.float16.convert_float_to_float16`` (it rewrites
    Cast targets and keeps integer paths as they are) with ``keep_io_types=True``, its
    default op block list plus FP16_EXTRA_BLOCKED_OPS, every node of a non-standard
    domain (``ai.onnx.ml``), and the nodes named in ``keep_fp32``, which stay float32
    behind Casts. Then drops the stale ``value_info``, restores graph I/O types the
    converter changed, sorts the graph (subgraph reads included), checks it with
    ``onnx.checker``, loads it in ONNX Runtime and, given ``feeds``, runs it once.

    Returns a report: converter, ops and nodes kept in float32, Cast nodes added,
    initializer values outside float16's range, sizes in bytes. Raises ``BuildFailed``
    naming the failed step.
    """
    import onnxruntime
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    started = time.perf_counter()
    model = _load(onnx_path, "fp16")
    _name_nodes(model.graph)
    size_before = onnx_path.stat().st_size
    block_ops = set(DEFAULT_OP_BLOCK_LIST) | set(FP16_EXTRA_BLOCKED_OPS)
    recurrent_io = {
        name
        for node in model.graph.node
        if node.op_type in RECURRENT_OPS
        for name in (*node.input, *node.output)
    }
    # Constants float16 cannot hold (a BatchNormalization variance of 1e8) stay float32
    # with the nodes that read them, instead of being clamped to 65504.
    out_of_range = _constants_outside_fp16(model)
    _constants_to_initializers(model, out_of_range)
    kept_fp32 = [
        node
        for node in model.graph.node
        if node.op_type in block_ops
        or node.domain not in ("", "ai.onnx")
        or node.name in set(keep_fp32)
        or (recurrent_io and node.op_type == "Transpose")
        or recurrent_io & {*node.input, *node.output}
        or out_of_range & {*node.input, *node.output}
    ]
    casts_before = sum(node.op_type == "Cast" for node in model.graph.node)
    clamped = _values_outside_fp16_range(model)
    model_types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}

    try:
        with warnings.catch_warnings(), _quiet_logger("onnxruntime.transformers"):
            warnings.simplefilter("ignore")
            converted = convert_float_to_float16(
                model,
                keep_io_types=True,
                op_block_list=sorted(block_ops),
                node_block_list=[node.name for node in kept_fp32],
            )
    except Exception as exc:  # the converter raises bare ValueErrors and KeyErrors
        raise BuildFailed(f"fp16: the float16 conversion failed: {_short(exc)}") from exc
    # Shapes inferred before the conversion still say float32 and contradict the
    # converted nodes; ONNX Runtime refuses such graphs.
    del converted.graph.value_info[:]
    repaired = _restore_io_types(model_types, converted.graph)
    moved = _place_subgraph_casts(converted.graph)
    _sort_topologically(converted.graph)
    _drop_float16_round_trips(converted)  # after sorting: shape inference reads in order

    with atomic_output(output_path) as temp_path:
        _save(converted, temp_path, "fp16")
        _check(temp_path, "fp16")
        _smoke_run(temp_path, "fp16", feeds=feeds)

    float16_values = _float16_values(converted.graph)
    return {
        "converter": (
            f"onnxruntime {onnxruntime.__version__} transformers.float16.convert_float_to_float16"
            "(keep_io_types=True)"
        ),
        # No float16 weight, constant or cast anywhere: every op stayed float32.
        "float16_values": float16_values,
        "converted_nothing": float16_values == 0,
        "fp32_op_types": sorted({node.op_type for node in kept_fp32}),
        "fp32_nodes": [node.name for node in kept_fp32],
        "fp32_subgraph_nodes": _blocked_in_subgraphs(converted.graph, block_ops),
        "casts_moved_into_subgraphs": moved,
        "cast_nodes_added": sum(node.op_type == "Cast" for node in converted.graph.node) - casts_before,
        "initializer_values_clamped": clamped,
        "fp32_constants_outside_fp16_range": sorted(out_of_range),
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
    exclude_nodes: Collection[str] = (),
    signature: Signature | None = None,
    calibration: Int8Calibration | None = None,
) -> dict[str, Any]:
    """Insert int8 Q/DQ nodes calibrated on ``samples``.

    Steps: refuse a model with no float weighted op (``UnsupportedModel``); upgrade the
    opset to 13 when per-channel needs it; ``quant_pre_process`` (symbolic shape
    inference, retried without it when it fails on the graph); calibrate on the samples
    with ``method``; insert Q/DQ with
    ``quantize_static`` (QDQ, int8 per-channel weights, biases in float32),
    leaving out the nodes named in ``exclude_nodes`` (unnamed nodes are named
    ``<op type>_<index>``, as in ``convert_fp16``); run ``onnx.checker`` and run the
    model in ONNX Runtime on the first samples.

    Only QUANTIZED_OP_TYPES are quantized. ``symmetric_activations=True`` is NVIDIA's
    recipe for TensorRT: Q/DQ on their inputs, their outputs left float, int8
    activations, every zero point 0 (checked). ``False`` is for models only ONNX
    Runtime runs: their outputs are quantized too (ONNX Runtime fuses DQ-Conv-Q into a
    QLinearConv), uint8 activations with calibrated zero points and int8 weights
    (U8S8, the fastest int8 kernels on x86; int8 activations ran slower than FP32).

    The preparation and the calibration pass come from ``calibration``
    (``engines.int8_calibration``), which a build shares between attempts so that the
    samples run through the model once; without it they are made here, in a scratch
    directory beside ``output_path`` removed afterwards. ORT's quantization tools write
    scratch files into the working directory and the system temp dir; both point at
    the calibration's directory while they run.

    ``samples`` are keyed by input name with samples on axis 0, as ``load_samples``
    returns them (``signature`` tells how inputs without a sample axis are fed).
    Returns a report: method, sample count, opsets, Q/DQ node counts,
    ``quantized_op_types`` (op types reading at least one int8 tensor through a
    DequantizeLinear, with counts), per-channel weight count, sizes, pre-processing
    mode, the calibration's report (passes, phase times). Raises ``CalibrationError``
    when the samples do not fit the model's inputs, ``UnsupportedModel`` when nothing
    in the model can be quantized, ``BuildFailed`` for any other failed step.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from engines.int8_calibration import Int8Calibration, _calibration_batch_size

    started = time.perf_counter()
    onnx_path, output_path = onnx_path.absolute(), output_path.absolute()  # _scratch_in changes directory
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = _load(onnx_path, "int8")
    _check_quantizable(model)
    count = _check_samples(model, samples)
    batch_size = _calibration_batch_size(model)
    opset_before = _opset(model)
    del model
    report: dict[str, Any] = {
        "method": str(method),
        "samples": count,
        "calibration_batch_size": batch_size,
        "per_channel": per_channel,
        "symmetric_activations": symmetric_activations,
        "excluded_nodes": sorted(exclude_nodes),
        "opset_before": opset_before,
    }

    with contextlib.ExitStack() as stack:
        if calibration is None:
            scratch = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".int8-", dir=output_path.parent)
            )
            calibration = Int8Calibration(
                onnx_path, samples, signature, Path(scratch), per_channel=per_channel
            )
        temp_path = stack.enter_context(atomic_output(output_path))
        prepared = calibration.prepared()
        tensor_ranges, unusable = calibration.ranges(method)
        stack.enter_context(_scratch_in(calibration.workdir))
        report["pre_process"] = calibration.report()["pre_process"]
        kept_float = _touching(prepared, unusable)
        if kept_float:
            report["kept_float_for_nonfinite_range"] = kept_float
        extra_options: dict[str, Any] = {
            **TRT_QDQ_OPTIONS,
            "ActivationSymmetric": symmetric_activations,
            # Biases stay float (QuantizeBias False), so ORT's int32-bias scale adjustment
            # has nothing to do, and it crashes on per-channel MatMul weights.
            "QDQDisableWeightAdjustForInt32Bias": True,
        }
        if symmetric_activations:
            # NVIDIA's recipe: quantize the inputs of weighted ops, not their outputs.
            # ONNX Runtime needs the Q after a Conv to fuse it into a QLinearConv.
            extra_options["OpTypesToExcludeOutputQuantization"] = list(QUANTIZED_OP_TYPES)
        quantize_started = time.perf_counter()
        try:
            with _quiet_logger("root"), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(prepared),
                    str(temp_path),
                    calibration_data_reader=None,
                    calibration_cache_path=str(tensor_ranges),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=_ort_method(method),
                    op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                    nodes_to_exclude=[*exclude_nodes, *kept_float],
                    extra_options=extra_options,
                )
        except Exception as exc:  # ORT's quantizer raises whatever its helpers raise
            raise BuildFailed(f"int8: inserting Q/DQ nodes failed: {_short(exc)}") from exc

        quantized = _load(temp_path, "int8")
        report.update(_qdq_summary(quantized))
        if report["quantize_nodes"] == 0 and report["dequantize_nodes"] == 0:
            raise UnsupportedModel(
                "int8: the quantizer found nothing to quantize in this model "
                f"({', '.join(QUANTIZED_OP_TYPES)} with float weights); build it as fp16 or fp32"
            )
        if symmetric_activations:
            _check_zero_points(quantized)
        report["opset_after"] = _opset(quantized)
        del quantized
        _check(temp_path, "int8")
        first = next(iter_batches(samples, batch_size, signature))
        _smoke_run(temp_path, "int8", feeds=first)
        report["quantize_seconds"] = round(time.perf_counter() - quantize_started, 3)
        report["calibration"] = calibration.report()

    report["size_before_bytes"] = onnx_path.stat().st_size
    report["size_after_bytes"] = output_path.stat().st_size
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


DYNAMIC_OP_TYPES = ("MatMul",)
"""What dynamic INT8 quantizes: MatMuls with constant weights (int8 weights, activations
quantized per run). Convolutions stay float: on raw audio the first convolutions are
where int8 hurts, and ONNX Runtime's ConvInteger is slower than its float Conv."""


def quantize_int8_dynamic(
    onnx_path: Path,
    output_path: Path,
    *,
    exclude_nodes: Collection[str] = (),
    feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Dynamic INT8 with ONNX Runtime's ``quantize_dynamic``: int8 weights for the
    DYNAMIC_OP_TYPES, activations quantized at run time from each run's own range
    (MatMulInteger after DynamicQuantizeLinear), no calibration. The usual CPU recipe
    for transformer and speech models; ONNX Runtime only (TensorRT has no dynamic
    quantization). Checked with ``onnx.checker`` and run once on ``feeds``.

    Raises ``UnsupportedModel`` when no MatMul has constant weights, ``BuildFailed``
    for any other failed step.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    onnx_path, output_path = onnx_path.absolute(), output_path.absolute()  # _scratch_in changes directory
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = _load(onnx_path, "int8 dynamic")
    weights = {init.name for init in model.graph.initializer}
    if not any(node.op_type in DYNAMIC_OP_TYPES and node.input[1] in weights for node in model.graph.node):
        raise UnsupportedModel(
            "int8 dynamic: nothing to quantize: no MatMul with constant weights in the main graph"
        )
    renamed = _name_nodes(model.graph)
    with (
        tempfile.TemporaryDirectory(prefix=".int8-dynamic-", dir=output_path.parent) as scratch,
        atomic_output(output_path) as temp_path,
        _scratch_in(Path(scratch)),
    ):
        source = onnx_path
        if renamed:
            source = Path(scratch) / "named.onnx"
            _save(model, source, "int8 dynamic")
        del model
        try:
            with _quiet_logger("root"), contextlib.redirect_stdout(io.StringIO()):
                quantize_dynamic(
                    str(source),
                    str(temp_path),
                    op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                    per_channel=False,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude_nodes),
                    extra_options={"MatMulConstBOnly": True},
                )
        except Exception as exc:  # ORT's quantizer raises whatever its helpers raise
            raise BuildFailed(f"int8 dynamic: quantization failed: {_short(exc)}") from exc
        quantized = _load(temp_path, "int8 dynamic")
        integer_ops = Counter(
            node.op_type for node in quantized.graph.node if node.op_type.endswith("Integer")
        )
        if not integer_ops:
            raise UnsupportedModel(
                "int8 dynamic: nothing to quantize: no MatMul with constant weights in the main graph"
            )
        del quantized
        _check(temp_path, "int8 dynamic")
        _smoke_run(temp_path, "int8 dynamic", feeds=feeds)
    return {
        "mode": "dynamic",
        "quantizer": "onnxruntime quantize_dynamic (int8 weights, activations quantized per run)",
        "quantized_op_types": dict(sorted(integer_ops.items())),
        "excluded_nodes": sorted(exclude_nodes),
        "size_before_bytes": onnx_path.stat().st_size,
        "size_after_bytes": output_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }


QUANTIZED_MODEL_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)
"""Ops that mark a model as quantized already (QLinear* are matched by prefix too)."""


def already_quantized(model: onnx.ModelProto) -> list[str]:
    """The quantized op types in the model, sorted (empty for a float model)."""
    return sorted(
        {
            node.op_type
            for node in model.graph.node
            if node.op_type in QUANTIZED_MODEL_OPS or node.op_type.startswith("QLinear")
        }
    )


def _check_quantizable(model: onnx.ModelProto) -> None:
    """Refuse a model with no weighted op that has a float weight: int8 would only add
    Q/DQ pairs around other ops (tree ensembles, integer-only graphs)."""
    float_initializers = {
        init.name
        for init in model.graph.initializer
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    }
    constants = {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES and any(
            name in float_initializers or name in constants for name in node.input[1:2]
        ):
            return
    ops = sorted({node.op_type for node in model.graph.node})
    raise UnsupportedModel(
        "int8: nothing to quantize: the model has no "
        f"{', '.join(QUANTIZED_OP_TYPES)} with float weights in its main graph (its ops: "
        f"{', '.join(ops[:12])}{'...' if len(ops) > 12 else ''}; ops inside If or Loop "
        "subgraphs are not quantized); serve it as fp32 or fp16"
    )


@contextlib.contextmanager
def _scratch_in(directory: Path) -> Iterator[None]:
    """Point the working directory and the temp dir at ``directory`` while ORT's
    quantization tools run: symbolic shape inference saves ``sym_shape_infer_temp.onnx``
    and a ``<uuid>.data`` into the working directory when it gives up, and the quantizer
    makes temp dirs in the system temp dir."""
    previous_cwd = os.getcwd() if _cwd_exists() else None
    previous_tempdir = tempfile.tempdir
    os.chdir(directory)
    tempfile.tempdir = str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = previous_tempdir
        if previous_cwd is not None:
            os.chdir(previous_cwd)


def _cwd_exists() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    return True


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


def _touching(path: Path, tensors: Collection[str]) -> list[str]:
    """Names of the nodes that read or write any of ``tensors``."""
    if not tensors:
        return []
    wanted = set(tensors)
    model = onnx.load(path, load_external_data=False)
    return [node.name for node in model.graph.node if wanted & {*node.input, *node.output}]


def _ort_method(method: CalibrationMethod) -> Any:
    from onnxruntime.quantization import CalibrationMethod as OrtCalibrationMethod

    return OrtCalibrationMethod[_ORT_METHODS[CalibrationMethod(method)]]


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


def _check_zero_points(model: onnx.ModelProto) -> None:
    """TensorRT refuses any Q/DQ zero point other than 0 ("symmetric only")."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in _QDQ_OPS or len(node.input) < 3 or not node.input[2]:
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
        return  # nothing the model is known to accept: loading is the check
    try:
        outputs = session.run(None, dict(feeds))
    except Exception as exc:  # as above, at run time
        raise BuildFailed(f"{step}: the converted model fails to run in ONNX Runtime: {_short(exc)}") from exc
    if not outputs:
        raise BuildFailed(f"{step}: the converted model produced no outputs")


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


def _drop_float16_round_trips(model: onnx.ModelProto) -> None:
    """Join neighbouring float32 nodes that the converter split with a float16 round trip.

    The converter casts every block-listed node's outputs to float16 and back for the
    next block-listed node, so a value kept in float32 because it leaves float16's range
    still overflows between two kept nodes. A Cast to float32 of a Cast to float16 of a
    float32 value is dropped and its readers read the float32 value; the float16 Cast
    stays only while something else reads it. Types come from ONNX shape inference; a
    graph it cannot type is left as it is.
    """
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference fails on some custom domains: nothing is dropped
        return
    float32 = {
        value.name
        for value in (*inferred.value_info, *inferred.input, *inferred.output)
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    } | {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    producer = {output: node for node in graph.node for output in node.output}
    # Values read inside If/Loop bodies or leaving the graph keep their Casts.
    untouchable = {value.name for value in graph.output}
    for node in graph.node:
        untouchable |= _subgraph_inputs(node)
    replaced: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_target(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if (
            first is not None
            and first.op_type == "Cast"
            and _cast_target(first) == onnx.TensorProto.FLOAT16
            and first.input[0] in float32
            and node.output[0] not in untouchable
        ):
            replaced[node.output[0]] = first.input[0]
    if not replaced:
        return
    kept = [node for node in graph.node if not (node.op_type == "Cast" and node.output[0] in replaced)]
    for node in kept:
        node.input[:] = [replaced.get(name, name) for name in node.input]
    read = {name for node in kept for name in node.input} | untouchable
    kept = [
        node
        for node in kept
        if not (
            node.op_type == "Cast"
            and _cast_target(node) == onnx.TensorProto.FLOAT16
            and node.output[0] not in read
        )
    ]
    del graph.node[:]
    graph.node.extend(kept)


def _place_subgraph_casts(graph: onnx.GraphProto) -> int:
    """Move the Casts the converter put in the main graph for block-listed nodes inside
    If, Loop and Scan bodies into the body that defines their input.

    ONNX Runtime's converter appends every Cast it makes around a block-listed node to
    the main graph, where a value computed inside a subgraph (the boxes a NonMaxSuppression
    in an If branch reads) does not exist. Repeated until no Cast reads a value the main
    graph lacks, since a moved Cast's output may feed another misplaced Cast. Returns how
    many Casts moved.
    """
    homes: dict[str, onnx.GraphProto] = {}

    def index(owner: onnx.GraphProto) -> None:
        for node in owner.node:
            for subgraph in _subgraphs_of(node):
                names = [v.name for v in subgraph.input] + [i.name for i in subgraph.initializer]
                names += [out for inner in subgraph.node for out in inner.output]
                homes.update(dict.fromkeys(names, subgraph))
                index(subgraph)

    index(graph)
    moved = 0
    while True:
        in_scope = {v.name for v in graph.input} | {i.name for i in graph.initializer}
        in_scope |= {out for node in graph.node for out in node.output}
        misplaced = [
            node
            for node in graph.node
            if node.op_type == "Cast" and node.input[0] not in in_scope and node.input[0] in homes
        ]
        if not misplaced:
            return moved
        for node in misplaced:
            home = homes[node.input[0]]
            graph.node.remove(node)
            home.node.append(node)
            homes.update(dict.fromkeys(node.output, home))
            moved += 1


def _float16_values(graph: onnx.GraphProto) -> int:
    """Float16 initializers, Constants and Casts to float16 that something computes with
    (not a round trip straight back to float32), subgraphs included."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in {*node.input, *_subgraph_inputs(node)}:
            readers.setdefault(name, []).append(node)
    count = sum(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    for node in graph.node:
        if node.op_type == "Cast" and _cast_target(node) == onnx.TensorProto.FLOAT16:
            count += any(
                not (reader.op_type == "Cast" and _cast_target(reader) == onnx.TensorProto.FLOAT)
                for reader in readers.get(node.output[0], [])
            )
        elif node.op_type == "Constant":
            count += any(
                a.t.data_type == onnx.TensorProto.FLOAT16 for a in node.attribute if a.name == "value"
            )
        for subgraph in _subgraphs_of(node):
            count += _float16_values(subgraph)
    return count


def _blocked_in_subgraphs(graph: onnx.GraphProto, block_ops: Collection[str]) -> list[str]:
    """The block-listed ops inside If, Loop and Scan bodies, which stay float32:
    ``"NonMaxSuppression in If 'name'"``."""
    found = []
    for node in graph.node:
        for subgraph in _subgraphs_of(node):
            found += [
                f"{inner.op_type} in {node.op_type} '{node.name}'"
                for inner in subgraph.node
                if inner.op_type in block_ops
            ]
            found += _blocked_in_subgraphs(subgraph, block_ops)
    return sorted(set(found))


def _subgraphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attribute in node.attribute:
        graphs += list(attribute.graphs)
        if attribute.HasField("g"):
            graphs.append(attribute.g)
    return graphs


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), None)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (stable otherwise).

    Names used inside a node's subgraphs count as its inputs, since a subgraph may read
    outer-scope values; subgraphs (If and Loop bodies) are sorted too. A graph with a
    cycle is left as it is for the checker to report.
    """
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
                _sort_topologically(subgraph)
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
    """Float32 initializer values float16 cannot hold: clamped to its largest finite value
    or flushed from below its smallest subnormal by the converter."""
    from onnx import numpy_helper

    count = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        values = np.abs(numpy_helper.to_array(init))
        count += int(np.count_nonzero((values > 65504.0) | ((values > 0) & (values < 5.96e-08))))
    return count


def _constants_outside_fp16(model: onnx.ModelProto) -> set[str]:
    """Names of float initializers and Constant outputs with a finite value beyond
    float16's largest (65504)."""
    from onnx import numpy_helper

    tensors = [(init.name, init) for init in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    tensors.append((node.output[0], attribute.t))
    names = set()
    for name, tensor in tensors:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        values = np.abs(numpy_helper.to_array(tensor))
        if np.any(np.isfinite(values) & (values > 65504.0)):
            names.add(name)
    return names


def _constants_to_initializers(model: onnx.ModelProto, names: Collection[str]) -> None:
    """Turn the Constant nodes making ``names`` into initializers: the converter keeps an
    initializer float32 when only blocked nodes read it, but converts Constant nodes
    (clamping their values) whatever the block list says."""
    wanted = set(names)
    constants = [node for node in model.graph.node if node.op_type == "Constant" and node.output[0] in wanted]
    for node in constants:
        value = next(attribute.t for attribute in node.attribute if attribute.name == "value")
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)


def _name_nodes(graph: onnx.GraphProto) -> bool:
    """Give every unnamed node a unique name, ``<op type>_<index>``: block lists,
    exclusions and reports go by name, the same in fp16 and int8. Returns whether any
    node was renamed."""
    taken = {node.name for node in graph.node if node.name}
    renamed = False
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            renamed = True
    return renamed


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a library logger that reports every node it touches at INFO or WARNING."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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


__all__ = ["convert_fp16", "quantize_int8", "quantize_int8_dynamic"]
