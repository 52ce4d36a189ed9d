"""A fake ``tensorrt`` module in two variants: "10.x" and "11.x".

Both follow the API in shared/docs/TENSORRT.md, with the real class and member
names (a test checks the 11.x variant's names against the real 11.4 bindings).
The 11.x variant lacks everything TensorRT 11 removed (EXPLICIT_BATCH, the
precision builder flags, the INT8 calibrators, ``platform_has_*``, V1 memory
APIs ...), so code that touches them fails with AttributeError as on 11.x; the
10.x variant has them.

What it does for real: the parser reads the ONNX with ``onnx``; the builder
checks the optimization profile against the network; a "plan" carries the ONNX,
so an execution context runs it with ONNX Runtime on bytes it reads from and
writes to the fake device memory of ``FakeCudaRuntime``, when the stream is
synchronized. Rules the real library documents are enforced: breaches go to
``FakeTensorRT.violations`` and fail the call the way TensorRT would.

Where the real library raises, clamps or returns instead of failing, so does the
fake (sources: [WHL] the tensorrt_cu13_bindings 11.4 / tensorrt_cu12_bindings
10.16 wheels' docstrings and strings; [SRC] NVIDIA/TensorRT ``python/src`` and
``include/NvInferRuntime.h``; see shared/docs/TRT_AUDIT.md):

- ``IOptimizationProfile.set_shape`` raises RuntimeError and checks only its own
  arguments (same rank, 0 <= min <= opt <= max); a range that disagrees with the
  network fails ``build_serialized_network`` (None plus an ERROR log). [SRC
  ``opt_profile_set_shape``: PY_ASSERT_RUNTIME_ERROR; WHL "Shape provided for min
  is inconsistent with other shapes."]
- ``IExecutionContext.infer_shapes`` raises ``RuntimeError("infer_shapes error
  code: -1")`` when the input shapes are inconsistent: two inputs sharing a
  named dimension with different lengths, or a shape computation that fails.
  [SRC ``lambdas::infer_shapes``; ``NvInferRuntime.h`` ``inferShapes``]
- Kernels start at ``execute_async_v3``: the extent each output is written to is
  checked then, and a write outside a live allocation is an illegal address,
  the sticky ``cudaErrorIllegalAddress`` of ``FakeCudaRuntime``. [NvInferRuntime.h
  ``enqueueV3``: the whole output is written at the address given]
- ``create_timing_cache`` with an invalid blob logs a warning and returns an empty
  cache. [NVIDIA/TensorRT#1413: "Detected invalid timing cache, setup a local cache
  instead"]
- ``builder_optimization_level`` above the maximum clamps to it. [WHL: "Setting it
  to be greater than the maximum level results in identical behavior to the
  maximum level."]
- A plan deserializes only with the same TensorRT version, GPU and compute
  capability; otherwise None plus an ERROR log. [11.4 Support Matrix, "Engine
  portability"; WHL ``deserialize_cuda_engine``]
- ``add_optimization_profile`` returns -1 for an invalid profile and
  ``set_tensor_address`` returns False for a null address. [WHL docstrings]
"""

from __future__ import annotations

import enum
import json
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from tests.fakes.cudart import FakeCudaRuntime

PLAN_MAGIC = b"FAKEPLAN"
_LENGTH = struct.Struct("<I")
DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression", "Unique"}
FUSABLE_PRODUCERS = {"Conv", "Gemm", "MatMul"}
FUSABLE_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh"}


class _PybindEnum(enum.IntEnum):
    """IntEnum printing like a pybind11 enum ("ErrorCode.UNSUPPORTED_NODE")."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class DataType(_PybindEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


_NUMPY_OF = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
_FROM_ONNX = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.UINT8: DataType.UINT8,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.BFLOAT16: DataType.BF16,
}


def nptype(trt_type: DataType) -> type:
    """Like ``tensorrt.nptype``: TypeError for types numpy lacks (bf16, fp8, int4, fp4)."""
    if trt_type in _NUMPY_OF:
        return _NUMPY_OF[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")


class TensorIOMode(_PybindEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(_PybindEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class ProfilingVerbosity(_PybindEnum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class LayerInformationFormat(_PybindEnum):
    ONELINE = 0
    JSON = 1


class ExecutionContextAllocationStrategy(_PybindEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class ErrorCode(_PybindEnum):
    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8
    UNSUPPORTED_NODE_ATTR = 9
    UNSUPPORTED_NODE_INPUT = 10
    UNSUPPORTED_NODE_DATATYPE = 11
    UNSUPPORTED_NODE_DYNAMIC = 12
    UNSUPPORTED_NODE_SHAPE = 13
    REFIT_FAILED = 14


class NetworkDefinitionCreationFlag11(_PybindEnum):
    STRONGLY_TYPED = 1


class NetworkDefinitionCreationFlag10(_PybindEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag11(_PybindEnum):
    DEBUG = 1
    GPU_FALLBACK = 2
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 7
    SPARSE_WEIGHTS = 8
    SAFETY_SCOPE = 9
    DIRECT_IO = 12
    VERSION_COMPATIBLE = 16
    EXCLUDE_LEAN_RUNTIME = 17
    ERROR_ON_TIMING_CACHE_MISS = 18
    DISABLE_COMPILATION_CACHE = 20
    STRIP_PLAN = 21
    REFIT_IDENTICAL = 22
    WEIGHT_STREAMING = 23
    REFIT_INDIVIDUAL = 25
    STRICT_NANS = 26
    MONITOR_MEMORY = 27
    EDITABLE_TIMING_CACHE = 28
    DISTRIBUTIVE_INDEPENDENCE = 29


class BuilderFlag10(_PybindEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 5
    DISABLE_TIMING_CACHE = 6
    TF32 = 7
    SPARSE_WEIGHTS = 8
    SAFETY_SCOPE = 9
    OBEY_PRECISION_CONSTRAINTS = 10
    PREFER_PRECISION_CONSTRAINTS = 11
    DIRECT_IO = 12
    REJECT_EMPTY_ALGORITHMS = 13
    VERSION_COMPATIBLE = 14
    EXCLUDE_LEAN_RUNTIME = 15
    FP8 = 16
    ERROR_ON_TIMING_CACHE_MISS = 17
    BF16 = 18
    DISABLE_COMPILATION_CACHE = 19
    STRIP_PLAN = 20
    WEIGHTLESS = 21
    REFIT_IDENTICAL = 22
    WEIGHT_STREAMING = 23
    INT4 = 24
    REFIT_INDIVIDUAL = 25
    STRICT_NANS = 26
    MONITOR_MEMORY = 27
    FP4 = 28
    EDITABLE_TIMING_CACHE = 29


PRECISION_FLAGS_10 = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}


class _Severity(_PybindEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


# -- shared state --------------------------------------------------------------


@dataclass
class FakeTensorRT:
    """One fake ``tensorrt`` module (``self.module``) and what it saw."""

    version: str
    cudart: FakeCudaRuntime
    module: types.ModuleType = field(init=False)
    violations: list[str] = field(default_factory=list)
    build_error: str | None = None
    """When set, ``build_serialized_network`` logs it as an ERROR and returns None."""
    deserialize_returns_none: bool = False
    max_contexts: int | None = None
    """When set, ``create_execution_context`` returns None beyond this many live contexts."""
    build_hook: Callable[[], None] | None = None
    """Called inside ``build_serialized_network`` (e.g. to write the timing cache meanwhile)."""
    contexts: list[weakref.ref[Any]] = field(default_factory=list)
    engines: list[weakref.ref[Any]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    """Order in which contexts and engines were garbage-collected ("context", "engine")."""
    executions: int = 0
    executed_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)
    """The input shapes of every enqueued run, in order."""
    enqueue_error: str | None = None
    """When set, ``execute_async_v3`` logs it as an ERROR (unless empty) and returns False."""
    unsupported_ops: set[str] = field(default_factory=lambda: {"KilnMystery"})
    build_objects: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    """Live builders, networks, parsers and configs (what holds a build's memory)."""
    build_objects_at_deserialize: list[int] = field(default_factory=list)
    """How many build objects were alive at each ``deserialize_cuda_engine``."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.module = _make_module(self)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def violate(self, message: str) -> None:
        with self._lock:
            self.violations.append(message)

    def _current_device(self) -> Any:
        index = self.cudart.current_device()
        return self.cudart.devices[index] if 0 <= index < len(self.cudart.devices) else None

    def device_name(self) -> str:
        props = self._current_device()
        return props.name.decode() if props is not None else "none"

    def compute_capability(self) -> str:
        props = self._current_device()
        return f"{props.major}.{props.minor}" if props is not None else "none"

    def live_objects(self) -> dict[str, int]:
        return {
            "contexts": sum(1 for ref in self.contexts if ref() is not None),
            "engines": sum(1 for ref in self.engines if ref() is not None),
        }


def _require_logger(fake: FakeTensorRT, logger: Any, who: str) -> None:
    base = fake.module.ILogger
    if not isinstance(logger, base):
        fake.violate(f"{who} was given {type(logger).__name__}, not a tensorrt.ILogger")
        raise TypeError(f"{who}(): incompatible function arguments")
    if not getattr(logger, "_ilogger_initialized", False):
        fake.violate(f"{who}: the logger subclass did not call ILogger.__init__")
        raise TypeError("ILogger.__init__ was not called")


def _log(logger: Any, severity: _Severity, message: str) -> None:
    logger.log(severity, message)


# -- logger ------------------------------------------------------------------------


class ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        self._ilogger_initialized = True

    def log(self, severity: _Severity, msg: str) -> None:
        raise NotImplementedError("ILogger.log is pure virtual")


class Logger(ILogger):
    Severity = _Severity

    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: _Severity, msg: str) -> None:
        if severity <= self.min_severity:
            print(f"[TRT] {severity.name}: {msg}")


# -- network and parser ----------------------------------------------------------


@dataclass
class ITensor:
    name: str
    shape: tuple[int, ...]
    dtype: DataType
    is_shape_tensor: bool = False
    _dim_names: tuple[str, ...] = ()
    """The ONNX ``dim_param`` of each axis ("" where none): TensorRT makes equal names equal."""


class INetworkDefinition:
    def __init__(self, fake: FakeTensorRT, flags: int) -> None:
        self._fake = fake
        self._flags = flags
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._model: onnx.ModelProto | None = None

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._model.graph.node) if self._model is not None else 0

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


@dataclass
class ParserError:
    _code: ErrorCode
    _desc: str
    _node: int = -1
    _node_name: str = ""
    _node_operator: str = ""

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._node_operator

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 1

    def func(self) -> str:
        return "parseGraph"

    def __str__(self) -> str:
        return (
            f"In node {self._node} with name: {self._node_name} "
            f"and operator: {self._node_operator} {self._desc}"
        )


def _dims_of(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(
        dim.dim_value if dim.HasField("dim_value") else -1 for dim in value_info.type.tensor_type.shape.dim
    )


def _dim_names_of(value_info: onnx.ValueInfoProto) -> tuple[str, ...]:
    return tuple(
        dim.dim_param if dim.HasField("dim_param") else "" for dim in value_info.type.tensor_type.shape.dim
    )


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        self._network = network
        self._fake = network._fake
        _require_logger(self._fake, logger, "OnnxParser")
        self._fake.build_objects.add(self)
        self._logger = logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def supports_operator(self, op_type: str) -> bool:
        return op_type not in self._fake.unsupported_ops

    def parse(self, model: Any, path: str | None = None) -> bool:
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except Exception as exc:
            self._errors.append(
                ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse the ONNX model: {exc}")
            )
            return False
        for index, node in enumerate(proto.graph.node):
            if node.op_type in self._fake.unsupported_ops:
                self._errors.append(
                    ParserError(
                        ErrorCode.UNSUPPORTED_NODE,
                        f"No importer registered for op: {node.op_type}. Attempting to import as plugin.",
                        index,
                        node.name,
                        node.op_type,
                    )
                )
        if self._errors:
            return False
        initializers = {init.name for init in proto.graph.initializer}
        for value in proto.graph.input:
            if value.name in initializers:
                continue
            dtype = _FROM_ONNX[value.type.tensor_type.elem_type]
            self._network._inputs.append(
                ITensor(value.name, _dims_of(value), dtype, _dim_names=_dim_names_of(value))
            )
        for value in proto.graph.output:
            dtype = _FROM_ONNX[value.type.tensor_type.elem_type]
            self._network._outputs.append(ITensor(value.name, _dims_of(value), dtype))
        self._network._model = proto
        return True


# -- builder, config, profile, timing cache --------------------------------------------------


class IHostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


class IOptimizationProfile:
    def __init__(self, network_inputs: Callable[[], list[ITensor]]) -> None:
        self._network_inputs = network_inputs
        self._shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
        # The binding checks only its arguments and raises RuntimeError (PY_ASSERT_RUNTIME_ERROR);
        # the network is not consulted until build_serialized_network.
        low, mid, high = tuple(min), tuple(opt), tuple(max)
        if not len(low) == len(mid) == len(high):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        for axis in range(len(low)):
            if not 0 <= low[axis] <= mid[axis] <= high[axis]:
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self._shapes[input] = (low, mid, high)

    def get_shape(self, input: str) -> list[tuple[int, ...]]:
        return list(self._shapes.get(input, ()))

    def __bool__(self) -> bool:
        return bool(self._shapes)


class ITimingCache:
    def __init__(self, version: str, device: str, entries: dict[str, str] | None = None) -> None:
        self._version = version
        self._device = device
        self._entries = dict(entries or {})

    def serialize(self) -> IHostMemory:
        payload = {"version": self._version, "device": self._device, "entries": self._entries}
        return IHostMemory(json.dumps(payload, sort_keys=True).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache._version != self._version:
            return False
        if input_cache._device != self._device and not ignore_mismatch:
            return False
        self._entries.update(input_cache._entries)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


class IBuilderConfig:
    def __init__(self, fake: FakeTensorRT, logger: Any = None) -> None:
        self._fake = fake
        self._logger = logger
        self._pool_limits: dict[MemoryPoolType, int] = {}
        self._optimization_level = 3
        self._profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self._profiles: list[IOptimizationProfile] = []
        self._timing_cache: ITimingCache | None = None
        self._flags: set[Any] = set()

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if not isinstance(pool, MemoryPoolType) or int(pool_size) <= 0:
            raise TypeError("set_memory_pool_limit(): incompatible function arguments")
        self._pool_limits[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pool_limits.get(pool, 80 * 1024**3)

    @property
    def builder_optimization_level(self) -> int:
        return self._optimization_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        # WHL: above the maximum "results in identical behavior to the maximum level".
        # Below 0 is undocumented; kept strict.
        if int(level) < 0:
            raise ValueError("builder_optimization_level must not be negative")
        self._optimization_level = min(int(level), 5)

    @property
    def profiling_verbosity(self) -> ProfilingVerbosity:
        return self._profiling_verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: ProfilingVerbosity) -> None:
        if not isinstance(value, ProfilingVerbosity):
            raise TypeError("profiling_verbosity must be a ProfilingVerbosity")
        self._profiling_verbosity = value

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        # WHL: "returns the index of the optimization profile (starting from 0) if the input
        # is valid, or -1 if the input is not valid".
        if not profile:
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
        blob = bytes(serialized_timing_cache)
        if not blob:
            return ITimingCache(self._fake.version, self._fake.device_name())
        try:
            payload = json.loads(blob)
            return ITimingCache(payload["version"], payload["device"], payload["entries"])
        except (ValueError, KeyError, TypeError):
            # NVIDIA/TensorRT#1413: an invalid blob is replaced by an empty cache, with a warning.
            if self._logger is not None:
                _log(
                    self._logger,
                    _Severity.WARNING,
                    "Detected invalid timing cache, setup a local cache instead",
                )
            return ITimingCache(self._fake.version, self._fake.device_name())

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache._version != self._fake.version:
            return False
        if cache._device != self._fake.device_name() and not ignore_mismatch:
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache

    def set_flag(self, flag: Any) -> None:
        self._flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self._flags.discard(flag)

    def get_flag(self, flag: Any) -> bool:
        return flag in self._flags


class Builder:
    def __init__(self, logger: Any) -> None:
        fake = _FAKE_OF_CLASS[type(self)]
        _require_logger(fake, logger, "Builder")
        fake.build_objects.add(self)
        self._fake = fake
        self._logger = logger
        self._networks: list[INetworkDefinition] = []

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        fake = self._fake
        strongly_typed = 1 << int(fake.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if fake.major < 11 and not int(flags) & strongly_typed:
            fake.violate(
                "create_network without STRONGLY_TYPED on 10.x: precision would not come from the ONNX"
            )
        network = INetworkDefinition(fake, int(flags))
        self._networks.append(network)
        fake.build_objects.add(network)
        return network

    def create_builder_config(self) -> IBuilderConfig:
        config = self._fake.module.IBuilderConfig(self._fake, self._logger)
        self._fake.build_objects.add(config)
        return config

    def create_optimization_profile(self) -> IOptimizationProfile:
        networks = self._networks
        return IOptimizationProfile(lambda: networks[-1]._inputs if networks else [])

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        fake, logger = self._fake, self._logger
        if fake.build_hook is not None:
            fake.build_hook()
        _log(logger, _Severity.VERBOSE, "Original: 3 layers")
        _log(logger, _Severity.INFO, "[MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 100 (MiB)")
        _log(logger, _Severity.WARNING, "TF32 math is enabled by default for this fake build")
        if network._model is None:
            _log(logger, _Severity.ERROR, "Network must have at least one output")
            return None
        if fake.build_error is not None:
            _log(logger, _Severity.ERROR, fake.build_error)
            return None
        if network._flags and fake.major < 11:
            used = {getattr(flag, "name", str(flag)) for flag in config._flags} & PRECISION_FLAGS_10
            if used:
                _log(
                    logger,
                    _Severity.ERROR,
                    f"Precision flags {sorted(used)} cannot be set on a strongly typed network",
                )
                return None
        dynamic = [t for t in network._inputs if -1 in t.shape]
        if dynamic and not config._profiles:
            _log(
                logger,
                _Severity.ERROR,
                "[network.cpp::validate::3050] Error Code 4: Network has dynamic or shape inputs, "
                "but no optimization profile has been defined.",
            )
            return None
        profile = config._profiles[0] if config._profiles else None
        if profile is not None:
            by_name = {tensor.name: tensor for tensor in network._inputs}
            for name, (low, _, _) in profile._shapes.items():
                tensor = by_name.get(name)
                mismatch = tensor is None or len(low) != len(tensor.shape)
                if tensor is not None and not mismatch:
                    fixed = [(axis, dim) for axis, dim in enumerate(tensor.shape) if dim != -1]
                    mismatch = any(
                        bound[axis] != dim for axis, dim in fixed for bound in profile._shapes[name]
                    )
                if mismatch:
                    # The binding accepted the range; the builder is where it meets the network.
                    _log(
                        logger,
                        _Severity.ERROR,
                        f"IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                        f"(optimization profile for '{name}' does not match the network's input)",
                    )
                    return None
        inputs = []
        for tensor in network._inputs:
            shapes = profile._shapes.get(tensor.name) if profile is not None else None
            if -1 in tensor.shape and shapes is None:
                _log(
                    logger,
                    _Severity.ERROR,
                    f"Error Code 4: optimization profile is missing values for input {tensor.name}",
                )
                return None
            low, mid, high = shapes if shapes is not None else (tensor.shape, tensor.shape, tensor.shape)
            inputs.append(
                {
                    "name": tensor.name,
                    "dtype": int(tensor.dtype),
                    "shape": list(tensor.shape),
                    "dim_names": list(tensor._dim_names),
                    "profile": [list(low), list(mid), list(high)],
                }
            )
        outputs = [{"name": t.name, "dtype": int(t.dtype), "shape": list(t.shape)} for t in network._outputs]
        model = network._model
        if config._timing_cache is not None:
            for node in model.graph.node:
                config._timing_cache._entries[f"{model.graph.name}/{node.name}:{node.op_type}"] = "tactic-0"
        header = {
            "version": fake.version,
            "device": fake.device_name(),
            "compute_capability": fake.compute_capability(),
            "inputs": inputs,
            "outputs": outputs,
            "layers": _engine_layers(model, config._profiling_verbosity),
            "workspace": config._pool_limits.get(MemoryPoolType.WORKSPACE),
            "optimization_level": config._optimization_level,
            "profiling_verbosity": config._profiling_verbosity.name,
            "network_flags": network._flags,
        }
        payload = json.dumps(header).encode()
        return IHostMemory(PLAN_MAGIC + _LENGTH.pack(len(payload)) + payload + model.SerializeToString())


def plan_header(plan: bytes) -> dict[str, Any]:
    """What the fake builder recorded in a plan: its config and network settings."""
    (length,) = _LENGTH.unpack_from(plan, len(PLAN_MAGIC))
    start = len(PLAN_MAGIC) + _LENGTH.size
    header: dict[str, Any] = json.loads(plan[start : start + length])
    return header


def _engine_layers(model: onnx.ModelProto, verbosity: ProfilingVerbosity) -> list[Any]:
    """What the inspector reports: producer+activation pairs fused, one reformat layer."""
    nodes = list(model.graph.node)
    layers: list[dict[str, Any]] = [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0",
            "LayerType": "Reformat",
            "Metadata": "",
        }
    ]
    index = 0
    while index < len(nodes):
        node = nodes[index]
        following = nodes[index + 1] if index + 1 < len(nodes) else None
        if (
            following is not None
            and node.op_type in FUSABLE_PRODUCERS
            and following.op_type in FUSABLE_ACTIVATIONS
            and following.input[0] == node.output[0]
        ):
            layers.append(
                {
                    "Name": f"{node.name} + {following.name}",
                    "LayerType": "CaskGemm",
                    "Metadata": f"[ONNX Layer: {node.name}]\x1f[ONNX Layer: {following.name}]",
                }
            )
            index += 2
            continue
        layers.append(
            {"Name": node.name, "LayerType": node.op_type, "Metadata": f"[ONNX Layer: {node.name}]"}
        )
        index += 1
    if verbosity != ProfilingVerbosity.DETAILED:
        return [layer["Name"] for layer in layers]
    return layers


# -- runtime, engine, context, inspector -------------------------------------------------------


class Runtime:
    def __init__(self, logger: Any) -> None:
        fake = _FAKE_OF_CLASS[type(self)]
        _require_logger(fake, logger, "Runtime")
        self._fake = fake
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        fake = self._fake
        data = bytes(serialized_engine)
        if fake.deserialize_returns_none or not data.startswith(PLAN_MAGIC):
            _log(
                self._logger,
                _Severity.ERROR,
                "1: [stdArchiveReader.cpp::StdArchiveReader::32] Error Code 1: Serialization "
                "(Serialization assertion magicTagRead == kMAGIC_TAG failed."
                "Magic tag does not match)",
            )
            return None
        (length,) = _LENGTH.unpack_from(data, len(PLAN_MAGIC))
        start = len(PLAN_MAGIC) + _LENGTH.size
        header = json.loads(data[start : start + length])
        if header["version"] != fake.version:
            _log(
                self._logger,
                _Severity.ERROR,
                "The engine plan file is not compatible with this version of TensorRT, "
                f"expecting library version {fake.version} got {header['version']}",
            )
            return None
        fake.build_objects_at_deserialize.append(len(fake.build_objects))
        if (
            header["device"] != fake.device_name()
            or header["compute_capability"] != fake.compute_capability()
        ):
            _log(
                self._logger,
                _Severity.ERROR,
                "The engine plan file is generated on an incompatible device",
            )
            return None
        model = onnx.load_model_from_string(data[start + length :])
        engine = fake.module.ICudaEngine(fake, header, model, self._logger)
        fake.engines.append(weakref.ref(engine))
        weakref.finalize(engine, fake.released.append, "engine")
        return engine


@dataclass
class _IO:
    name: str
    is_input: bool
    dtype: DataType
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], ...] | None
    dim_names: tuple[str, ...] = ()


class ICudaEngine:
    def __init__(
        self, fake: FakeTensorRT, header: dict[str, Any], model: onnx.ModelProto, logger: Any
    ) -> None:
        self._fake = fake
        self._logger = logger
        self._header = header
        self._model = model
        self._io = [
            _IO(
                t["name"],
                True,
                DataType(t["dtype"]),
                tuple(t["shape"]),
                tuple(tuple(s) for s in t["profile"]),
                tuple(t["dim_names"]),
            )
            for t in header["inputs"]
        ] + [_IO(t["name"], False, DataType(t["dtype"]), tuple(t["shape"]), None) for t in header["outputs"]]
        self._by_name = {io.name: io for io in self._io}
        self._session: Any = None
        self._session_lock = threading.Lock()
        self._shape_cache: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}
        self._live_contexts = 0

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_layers(self) -> int:
        return len(self._header["layers"])

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    @property
    def device_memory_size_v2(self) -> int:
        return 1 << 20

    def get_tensor_name(self, index: int) -> str:
        return self._io[index].name

    def _tensor(self, name: str) -> _IO:
        if name not in self._by_name:
            self._fake.violate(f"engine asked about '{name}', which is not an I/O tensor")
            raise KeyError(name)
        return self._by_name[name]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self._tensor(name).is_input else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensor(name).dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        tensor = self._tensor(name)
        if not tensor.is_input or tensor.profile is None or profile_index != 0:
            raise RuntimeError(f"get_tensor_profile_shape: '{name}' has no profile {profile_index}")
        return list(tensor.profile)

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def create_execution_context(
        self,
        strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC,
    ) -> IExecutionContext | None:
        fake = self._fake
        if fake.max_contexts is not None and self._live_contexts >= fake.max_contexts:
            _log(
                self._logger,
                _Severity.ERROR,
                "Requested amount of GPU memory could not be allocated",
            )
            return None
        context = fake.module.IExecutionContext(self)
        self._live_contexts += 1
        fake.contexts.append(weakref.ref(context))
        weakref.finalize(context, fake.released.append, "context")
        return context

    def create_engine_inspector(self) -> IEngineInspector:
        return IEngineInspector(self)

    # -- what the contexts use ---------------------------------------------------

    def _run_model(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        with self._session_lock:
            if self._session is None:
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                self._session = ort.InferenceSession(
                    self._model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            session = self._session
        names = [io.name for io in self._io if not io.is_input]
        return dict(zip(names, session.run(names, feeds), strict=True))

    def _shapes_consistent(self, input_shapes: dict[str, tuple[int, ...]]) -> bool:
        """TensorRT's shape inference: equal dim names must have equal lengths, and the
        graph's shape computation must succeed (ONNX Runtime stands in for it)."""
        lengths: dict[str, int] = {}
        for io in self._io:
            if not io.is_input:
                continue
            for dim_name, size in zip(io.dim_names, input_shapes[io.name], strict=False):
                if dim_name and lengths.setdefault(dim_name, size) != size:
                    return False
        if any(node.op_type in DATA_DEPENDENT_OPS for node in self._model.graph.node):
            return True
        try:
            self._output_shapes(input_shapes)
        except Exception:  # ONNX Runtime's own error on an impossible shape
            return False
        return True

    def _output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        if any(node.op_type in DATA_DEPENDENT_OPS for node in self._model.graph.node):
            return {
                io.name: tuple(-1 if d == -1 else d for d in io.shape) for io in self._io if not io.is_input
            }
        key = tuple(sorted(input_shapes.items()))
        with self._session_lock:
            cached = self._shape_cache.get(key)
        if cached is None:
            feeds = {
                io.name: np.zeros(input_shapes[io.name], dtype=nptype(io.dtype))
                for io in self._io
                if io.is_input
            }
            cached = {name: tuple(array.shape) for name, array in self._run_model(feeds).items()}
            with self._session_lock:
                self._shape_cache[key] = cached
        return cached


class IExecutionContext:
    """Enforces: shapes within the profile (``set_input_shape`` returns False outside
    it [WHL]), every I/O address and input shape set before execute (``enqueueV3``
    [NvInferRuntime.h]), a live non-default stream (the default stream adds syncs
    [WHL ``execute_async_v3``]; kiln never uses it), and no use by a second thread
    while one run is active (developer guide, "Thread Safety": one context per
    concurrent inference)."""

    def __init__(self, engine: ICudaEngine) -> None:
        self._engine_ref = weakref.ref(engine)  # so dropping the engine first is visible
        self._fake = engine._fake
        self._input_shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._state_lock = threading.Lock()
        self._active_thread: int | None = None
        self._depth = 0
        self._pending = False

    def __del__(self) -> None:
        engine = self._engine_ref()
        if engine is not None:
            engine._live_contexts -= 1

    def _engine(self) -> ICudaEngine:
        engine = self._engine_ref()
        if engine is None:
            self._fake.violate("execution context used after its engine was released")
            raise RuntimeError("engine released")
        return engine

    def _enter(self, what: str) -> None:
        me = threading.get_ident()
        with self._state_lock:
            if self._active_thread not in (None, me):
                self._fake.violate(f"{what}: execution context entered by two threads at once")
            self._active_thread = me
            self._depth += 1

    def _leave(self) -> None:
        with self._state_lock:
            self._depth -= 1
            if self._depth == 0 and not self._pending:
                self._active_thread = None

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self._enter("set_input_shape")
        try:
            time.sleep(0.0005)  # widen the window in which a second thread would be caught
            engine = self._engine()
            tensor = engine._tensor(name)
            shape = tuple(int(d) for d in shape)
            if not tensor.is_input or tensor.profile is None:
                _log(engine._logger, _Severity.ERROR, f"setInputShape: '{name}' is not an input")
                return False
            low, _, high = tensor.profile
            if len(shape) != len(low) or any(
                not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
            ):
                _log(
                    engine._logger,
                    _Severity.ERROR,
                    "IExecutionContext::setInputShape: Error Code 3: API Usage Error "
                    f"(shape {list(shape)} "
                    f"of '{name}' is outside the profile [{list(low)}, {list(high)}])",
                )
                return False
            self._input_shapes[name] = shape
            return True
        finally:
            self._leave()

    def infer_shapes(self) -> list[str]:
        self._enter("infer_shapes")
        try:
            engine = self._engine()
            missing = [io.name for io in engine._io if io.is_input and io.name not in self._input_shapes]
            if missing:
                return missing
            if not engine._shapes_consistent(dict(self._input_shapes)):
                # SRC lambdas::infer_shapes: inferShapes < 0 becomes this RuntimeError.
                _log(engine._logger, _Severity.ERROR, "IExecutionContext::inferShapes: Error Code 7")
                raise RuntimeError("infer_shapes error code: -1")
            return []
        finally:
            self._leave()

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        self._enter("get_tensor_shape")
        try:
            engine = self._engine()
            tensor = engine._tensor(name)
            if tensor.is_input:
                return self._input_shapes.get(name, tensor.shape)
            if any(io.is_input and io.name not in self._input_shapes for io in engine._io):
                return tuple(-1 for _ in tensor.shape)
            return engine._output_shapes(dict(self._input_shapes))[name]
        finally:
            self._leave()

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._enter("set_tensor_address")
        try:
            engine = self._engine()
            engine._tensor(name)
            if not int(memory):
                _log(engine._logger, _Severity.ERROR, f"setTensorAddress: null address for '{name}'")
                return False
            self._addresses[name] = int(memory)
            return True
        finally:
            self._leave()

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._enter("execute_async_v3")
        try:
            return self._execute(int(stream_handle))
        finally:
            self._leave()

    def _execute(self, stream_handle: int) -> bool:
        engine, fake = self._engine(), self._fake
        missing_shapes = [io.name for io in engine._io if io.is_input and io.name not in self._input_shapes]
        missing_addresses = [io.name for io in engine._io if not self._addresses.get(io.name)]
        if missing_shapes or missing_addresses:
            fake.violate(
                f"execute_async_v3 before input shapes {missing_shapes} / "
                f"tensor addresses {missing_addresses} were set"
            )
            _log(
                engine._logger,
                _Severity.ERROR,
                "Error Code 3: API Usage Error (tensor address or shape not set)",
            )
            return False
        if not fake.cudart.require_device("execute_async_v3"):
            return False
        if fake.enqueue_error is not None:
            if fake.enqueue_error:
                _log(engine._logger, _Severity.ERROR, fake.enqueue_error)
            return False
        input_shapes = dict(self._input_shapes)
        with fake._lock:
            fake.executed_shapes.append(input_shapes)
        addresses = dict(self._addresses)
        output_shapes = engine._output_shapes(input_shapes)
        # Kernels start now, not at the stream sync: each output is written in full at its
        # address. A write outside a live allocation is an illegal address, and sticky.
        for io in engine._io:
            if io.is_input:
                continue
            itemsize = np.dtype(nptype(io.dtype)).itemsize
            if any(dim < 0 for dim in output_shapes[io.name]):
                continue  # data-dependent: TensorRT would need an IOutputAllocator
            nbytes = int(np.prod(output_shapes[io.name], dtype=np.int64)) * itemsize
            if not fake.cudart.fits_device(addresses[io.name], nbytes):
                fake.violate(
                    f"kernel writing '{io.name}': {nbytes} bytes at {addresses[io.name]:#x} do not fit "
                    "a live device allocation"
                )
                fake.cudart.fault(fake.cudart.module.cudaError_t.cudaErrorIllegalAddress)
                return True  # the enqueue itself succeeds; the fault surfaces at the next sync

        def run() -> None:
            try:
                feeds = {}
                for io in engine._io:
                    if not io.is_input:
                        continue
                    dtype = np.dtype(nptype(io.dtype))
                    shape = input_shapes[io.name]
                    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    data = fake.cudart.read_device(addresses[io.name], nbytes, f"kernel reading '{io.name}'")
                    if data is None:
                        return
                    feeds[io.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
                time.sleep(0.002)  # "GPU time": keeps the run in flight long enough to catch sharing
                results = engine._run_model(feeds)
                for name, array in results.items():
                    if tuple(array.shape) != output_shapes[name]:
                        fake.violate(f"output '{name}' shape changed between enqueue and run")
                    fake.cudart.write_device(
                        addresses[name],
                        np.ascontiguousarray(array).tobytes(),
                        f"kernel writing '{name}'",
                    )
                with fake._lock:
                    fake.executions += 1
            finally:
                with self._state_lock:
                    self._pending = False
                    if self._depth == 0:
                        self._active_thread = None

        with self._state_lock:
            self._pending = True
        if not fake.cudart.enqueue(stream_handle, run, "execute_async_v3"):
            with self._state_lock:
                self._pending = False
            return False
        return True


class IEngineInspector:
    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self.execution_context: IExecutionContext | None = None

    def get_engine_information(self, format: LayerInformationFormat) -> str:
        engine = self._engine
        layers = engine._header["layers"]
        if format != LayerInformationFormat.JSON:
            return "\n".join(layer["Name"] if isinstance(layer, dict) else layer for layer in layers)
        info: dict[str, Any] = {"Layers": layers}
        if engine._fake.major >= 11:
            info["I/O Tensors"] = [
                {
                    "Name": io.name,
                    "IOMode": "Input" if io.is_input else "Output",
                    "DataType": io.dtype.name,
                    "Dimensions": list(io.shape),
                    "Location": "Device",
                    "IsShapeInferenceIO": False,
                }
                for io in engine._io
            ]
        else:
            info["Bindings"] = [io.name for io in engine._io]
        return json.dumps(info)

    def get_layer_information(self, layer: int, format: LayerInformationFormat) -> str:
        entry = self._engine._header["layers"][layer]
        return json.dumps(entry) if format == LayerInformationFormat.JSON else str(entry)


# -- what only 10.x has ------------------------------------------------------------------


class _Removed10Builder(Builder):
    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    @property
    def platform_has_fast_int8(self) -> bool:
        return True

    @property
    def platform_has_tf32(self) -> bool:
        return True


class _Removed10BuilderConfig(IBuilderConfig):
    int8_calibrator: Any = None
    algorithm_selector: Any = None

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        return True

    def get_calibration_profile(self) -> IOptimizationProfile | None:
        return None


class _Removed10Engine(ICudaEngine):
    @property
    def device_memory_size(self) -> int:
        return 1 << 20

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        return 1 << 20

    def create_execution_context_without_device_memory(self) -> IExecutionContext | None:
        return self.create_execution_context()


class _Removed10Context(IExecutionContext):
    @property
    def all_shape_inputs_specified(self) -> bool:
        return True


class IInt8Calibrator:
    pass


class IInt8EntropyCalibrator2(IInt8Calibrator):
    pass


class IInt8MinMaxCalibrator(IInt8Calibrator):
    pass


class CalibrationAlgoType(_PybindEnum):
    LEGACY_CALIBRATION = 0
    ENTROPY_CALIBRATION = 1
    ENTROPY_CALIBRATION_2 = 2
    MINMAX_CALIBRATION = 3


REMOVED_IN_11 = (
    "EXPLICIT_BATCH",
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "REJECT_EMPTY_ALGORITHMS",
    "WEIGHTLESS",
    "IInt8Calibrator",
    "IInt8EntropyCalibrator2",
    "IInt8MinMaxCalibrator",
    "CalibrationAlgoType",
    "int8_calibrator",
    "set_calibration_profile",
    "get_calibration_profile",
    "algorithm_selector",
    "platform_has_fast_fp16",
    "platform_has_fast_int8",
    "platform_has_tf32",
    "device_memory_size",
    "get_device_memory_size_for_profile",
    "has_implicit_batch_dimension",
    "create_execution_context_without_device_memory",
    "all_shape_inputs_specified",
)
"""Names the 10.x fake has and the 11.x fake lacks (a subset of TENSORRT.md section 7)."""


_FAKE_OF_CLASS: dict[type, FakeTensorRT] = {}


def _make_module(fake: FakeTensorRT) -> types.ModuleType:
    """A fresh module whose classes are bound to ``fake`` (subclassed per fake)."""
    legacy = fake.major < 11
    module = types.ModuleType("tensorrt")
    module.__version__ = fake.version  # type: ignore[attr-defined]
    builder_base = _Removed10Builder if legacy else Builder
    runtime_class = type("Runtime", (Runtime,), {})
    builder_class = type("Builder", (builder_base,), {})
    _FAKE_OF_CLASS[runtime_class] = fake
    _FAKE_OF_CLASS[builder_class] = fake
    names: dict[str, Any] = {
        "ILogger": type("ILogger", (ILogger,), {}),
        "Builder": builder_class,
        "Runtime": runtime_class,
        "OnnxParser": OnnxParser,
        "INetworkDefinition": INetworkDefinition,
        "ITensor": ITensor,
        "IBuilderConfig": _Removed10BuilderConfig if legacy else IBuilderConfig,
        "IOptimizationProfile": IOptimizationProfile,
        "ITimingCache": ITimingCache,
        "IHostMemory": IHostMemory,
        "ICudaEngine": _Removed10Engine if legacy else ICudaEngine,
        "IExecutionContext": _Removed10Context if legacy else IExecutionContext,
        "IEngineInspector": IEngineInspector,
        "ParserError": ParserError,
        "DataType": DataType,
        "TensorIOMode": TensorIOMode,
        "MemoryPoolType": MemoryPoolType,
        "ProfilingVerbosity": ProfilingVerbosity,
        "LayerInformationFormat": LayerInformationFormat,
        "ExecutionContextAllocationStrategy": ExecutionContextAllocationStrategy,
        "ErrorCode": ErrorCode,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag10
        if legacy
        else NetworkDefinitionCreationFlag11,
        "BuilderFlag": BuilderFlag10 if legacy else BuilderFlag11,
        "nptype": nptype,
    }
    names["Logger"] = type("Logger", (names["ILogger"], Logger), {})
    if legacy:
        names.update(
            {
                "IInt8Calibrator": IInt8Calibrator,
                "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
                "IInt8MinMaxCalibrator": IInt8MinMaxCalibrator,
                "CalibrationAlgoType": CalibrationAlgoType,
            }
        )
    for name, value in names.items():
        setattr(module, name, value)
    return module


def python_names_11() -> set[str]:
    """Every public name the 11.x fake exposes: module attributes, enum members, class members."""
    fake_module = _make_module(FakeTensorRT("11.4.0.106", FakeCudaRuntime()))
    found: set[str] = set()
    for name, value in vars(fake_module).items():
        if name.startswith("_") and name != "__version__":
            continue
        found.add(name)
        if isinstance(value, type):
            if issubclass(value, enum.Enum):
                found.update(member.name for member in value)
                continue
            for klass in value.__mro__:
                if klass.__module__ != __name__:
                    continue
                found.update(attr for attr in vars(klass) if not attr.startswith("_"))
    return found
