"""Building a plan: network from the ONNX, optimization profile, builder config.

A strongly typed network parsed from the (possibly FP16 or Q/DQ) ONNX, so
precision comes from the graph and no precision flag is set (TensorRT 11 removed
them); one optimization profile from the batching limits plus the user's ranges
for other dynamic dims; DETAILED profiling verbosity for the fusion report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import ProgressCallback
from engines.backends.tensorrt.library import check_io_types, dims, errors_or, first_line, numpy_dtype
from engines.backends.tensorrt.timing_cache import TimingCacheFile
from engines.errors import BuildFailed, EngineError, UnsupportedModel
from engines.types import DYNAMIC, BuildOptions, Signature

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shapes of one input in an optimization profile."""

MAX_OPTIMIZATION_LEVEL = 5


def network_flags(trt: Any) -> int:
    # Strong typing takes every tensor's type from the ONNX graph: opt-in on 10.x,
    # always on (flag accepted and ignored) on 11.x.
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def parse_failure(parser: Any, logger: Any) -> EngineError:
    """The parser's errors as one user-facing error naming nodes and operators.

    ``UnsupportedModel`` when TensorRT does not support a node, else ``BuildFailed``.
    """
    issues: list[dict[str, Any]] = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        issues.append(
            {
                "code": str(error.code()),
                "node_index": int(error.node()),
                "node_name": str(error.node_name()),
                "node_operator": str(error.node_operator()),
                "description": str(error.desc()),
            }
        )
    if not issues:
        return BuildFailed(
            "TensorRT's ONNX parser rejected the model: "
            + errors_or(logger, "it gave no reason (see the build log)"),
            details={"log": logger.messages()},
        )
    lines = []
    for issue in issues:
        if issue["node_name"] or issue["node_operator"]:
            where = f"node '{issue['node_name']}' ({issue['node_operator'] or 'unknown operator'})"
        elif issue["node_index"] >= 0:
            where = f"node #{issue['node_index']}"
        else:
            where = "the graph"
        lines.append(f"{where}: {issue['description']}")
    shown = "; ".join(lines[:10]) + (f"; and {len(lines) - 10} more" if len(lines) > 10 else "")
    unsupported = any("UNSUPPORTED" in issue["code"].upper() for issue in issues)
    error_class = UnsupportedModel if unsupported else BuildFailed
    return error_class(
        f"TensorRT's ONNX parser rejected the model: {shown}",
        details={"parser_errors": issues, "log": logger.messages()},
    )


def _missing_range_message(name: str, shape: tuple[int, ...], axis: int, batch: bool) -> str:
    example = [(1 if batch and i == 0 else (dim if dim != DYNAMIC else 1)) for i, dim in enumerate(shape)]
    return (
        f"input '{name}' (shape {list(shape)}) has dynamic dimension {axis}, which is not the "
        "batch dimension, and TensorRT needs its range to build. Pass it in the `shapes` "
        "build option as full min/opt/max shapes of this input, e.g. "
        f'shapes={{"{name}": {{"min": {example}, "opt": [...], "max": [...]}}}}'
    )


def optimization_profile(
    network_inputs: Sequence[tuple[str, tuple[int, ...]]],
    signature: Signature,
    options: BuildOptions,
) -> dict[str, ShapeTriple]:
    """The (min, opt, max) shape of every input with a dynamic dimension.

    Axis 0 of a batchable signature spans 1 .. ``max_batch_size`` with opt at
    ``opt_batch_size`` (or half the max, at least 1); the values a ``shapes`` range
    gives for axis 0 are ignored there. Other dynamic dims come from ``shapes``;
    fixed dims stay as the model fixes them (an unbatched model's axis 0 included).
    Inputs without dynamic dims are left out. Raises ``BuildFailed`` naming the
    input and what to pass when a range is missing or invalid.
    """
    max_batch = options.max_batch_size
    opt_batch = options.opt_batch_size or max(1, max_batch // 2)
    if signature.batchable and not 1 <= opt_batch <= max_batch:
        raise BuildFailed(
            f"batching limits must satisfy 1 <= opt_batch_size <= max_batch_size; "
            f"got opt_batch_size={opt_batch}, max_batch_size={max_batch}"
        )
    ranges = {shape_range.input_name: shape_range for shape_range in options.shapes}
    input_names = [name for name, _ in network_inputs]
    unknown = sorted(ranges.keys() - set(input_names))
    if unknown:
        raise BuildFailed(
            f"`shapes` names input(s) {unknown} that the model does not have; its inputs are {input_names}"
        )
    profile: dict[str, ShapeTriple] = {}
    for name, shape in network_inputs:
        given = ranges.get(name)
        if given is None and all(dim != DYNAMIC for dim in shape):
            continue
        if given is not None:
            for label, bound in (("min", given.min), ("opt", given.opt), ("max", given.max)):
                if len(bound) != len(shape):
                    raise BuildFailed(
                        f"`shapes` for input '{name}': {label} {list(bound)} has rank "
                        f"{len(bound)}, the input has rank {len(shape)} (shape {list(shape)})"
                    )
        low: list[int] = []
        optimal: list[int] = []
        high: list[int] = []
        for axis, dim in enumerate(shape):
            if signature.batchable and axis == 0:
                if dim != DYNAMIC:
                    raise BuildFailed(
                        f"input '{name}' has a fixed batch dimension ({dim}) but the signature "
                        "says the model is batchable; re-export it with a dynamic first dimension"
                    )
                bounds = (1, opt_batch, max_batch)
            elif dim != DYNAMIC:
                if given is not None and any(b[axis] != dim for b in (given.min, given.opt, given.max)):
                    raise BuildFailed(
                        f"`shapes` for input '{name}' sets dimension {axis}, which the model fixes "
                        f"at {dim}; min/opt/max must all be {dim} there"
                    )
                bounds = (dim, dim, dim)
            else:
                if given is None:
                    raise BuildFailed(_missing_range_message(name, shape, axis, signature.batchable))
                bounds = (given.min[axis], given.opt[axis], given.max[axis])
                if not 0 <= bounds[0] <= bounds[1] <= bounds[2]:
                    raise BuildFailed(
                        f"`shapes` for input '{name}' dimension {axis}: need "
                        f"0 <= min <= opt <= max, got min={bounds[0]}, opt={bounds[1]}, "
                        f"max={bounds[2]}"
                    )
            low.append(bounds[0])
            optimal.append(bounds[1])
            high.append(bounds[2])
        profile[name] = (tuple(low), tuple(optimal), tuple(high))
    return profile


@dataclass
class BuiltPlan:
    """What a build leaves behind once its builder objects are gone."""

    plan: Any
    """TensorRT's ``IHostMemory`` holding the serialized plan."""
    network_layers: int
    profile: dict[str, ShapeTriple]
    timing_cache: dict[str, Any] | None


def build_plan(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    signature: Signature,
    options: BuildOptions,
    timing_cache_path: Path | None,
    progress: ProgressCallback,
) -> BuiltPlan:
    """Parse, configure and build; every builder object is released on return."""
    progress("parse", 0.0)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # The path lets the parser find external weights next to the model.
    parsed = parser.parse(onnx_path.read_bytes(), str(onnx_path))
    if not parsed or parser.num_errors > 0:
        raise parse_failure(parser, logger)
    network_inputs: list[tuple[str, tuple[int, ...]]] = []
    input_types: list[tuple[str, np.dtype[Any]]] = []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        network_inputs.append((tensor.name, dims(tensor.shape)))
        input_types.append((tensor.name, numpy_dtype(trt, tensor.dtype, f"input '{tensor.name}'")))
    output_types = []
    for index in range(network.num_outputs):
        tensor = network.get_output(index)
        output_types.append((tensor.name, numpy_dtype(trt, tensor.dtype, f"output '{tensor.name}'")))
    check_io_types(input_types, signature.inputs, "input")
    check_io_types(output_types, signature.outputs, "output")
    progress("parse", 1.0)

    profile_shapes = optimization_profile(network_inputs, signature, options)
    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (low, optimal, high) in profile_shapes.items():
            try:
                profile.set_shape(name, low, optimal, high)
            except (RuntimeError, ValueError) as exc:  # the bindings raise RuntimeError
                raise BuildFailed(
                    f"TensorRT rejected the shape range of input '{name}' (min {list(low)}, "
                    f"opt {list(optimal)}, max {list(high)}): {first_line(exc)}"
                ) from exc
        if config.add_optimization_profile(profile) < 0:
            raise BuildFailed(
                "TensorRT refused the optimization profile "
                f"{ {name: [list(bound) for bound in triple] for name, triple in profile_shapes.items()} }: "
                + errors_or(logger, "no reason logged")
            )
    timing_cache = TimingCacheFile(timing_cache_path) if timing_cache_path is not None else None
    if timing_cache is not None:
        timing_cache.attach(config)

    progress("build", 0.0)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildFailed(
            "TensorRT could not build an engine: "
            + errors_or(logger, "the builder returned no plan and logged no error"),
            details={"log": logger.messages()},
        )
    if memoryview(plan).nbytes == 0:
        raise BuildFailed("TensorRT returned an empty plan", details={"log": logger.messages()})
    if timing_cache is not None:
        timing_cache.save(config)
    return BuiltPlan(
        plan=plan,
        network_layers=int(network.num_layers),
        profile=profile_shapes,
        timing_cache=timing_cache.report() if timing_cache is not None else None,
    )
