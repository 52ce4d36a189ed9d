"""The TensorRT backend: kiln's engine on NVIDIA GPUs (TensorRT 10.x and 11.x).

Build: a strongly typed network parsed from the (possibly FP16 or Q/DQ) ONNX, so
precision comes from the graph and no precision flag is set (TensorRT 11 removed
them); one optimization profile from the batching limits plus the user's ranges
for other dynamic dims; a timing cache kept in the store per device signature;
DETAILED profiling verbosity and an engine-inspector report of the fused layers.

The artifact is a small kiln header (JSON: the device signature, TensorRT version
and profile it was built with) followed by the serialized TensorRT plan; ``load``
refuses an artifact recorded for another device signature. A bare plan (no
header, e.g. from trtexec) also loads, trusting the caller's cache key.

Run: one deserialized engine shared by a pool of ``instances`` slots, each one
execution context, one non-default stream and pinned host plus device buffers
sized for the profile's largest shapes. An ``infer`` call holds one slot, so a
context is never used by two threads at once.

``tensorrt`` is imported lazily, inside functions, always under the local name
``trt`` (the static API check in the tests relies on that). Nothing that
TensorRT 11 removed is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends import cuda
from engines.backends.base import Backend, ProgressCallback, Runner, no_progress
from engines.device import gpu_device_info
from engines.errors import (
    BackendUnavailable,
    BuildFailed,
    EngineError,
    InvalidInput,
    StoreCorrupted,
    UnsupportedModel,
)
from engines.types import DYNAMIC, BuildOptions, DeviceSignature, Signature

_log = logging.getLogger(__name__)

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shapes of one input in an optimization profile."""

ARTIFACT_MAGIC = b"KILN-TRT"
_HEADER_LENGTH = struct.Struct("<I")
_MAX_LOGGED_MESSAGES = 500
_MAX_OPTIMIZATION_LEVEL = 5


class TensorRTExecutionError(EngineError):
    """TensorRT failed while running a batch that passed the input checks."""

    kind = "inference_failed"


def _import_tensorrt() -> Any:
    """The ``tensorrt`` module. Raises ``BackendUnavailable`` when it does not import."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"tensorrt does not import ({_first_line(exc)}); install kiln with the 'gpu' extra "
            "on a machine with an NVIDIA GPU"
        ) from exc
    return trt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _dims(shape: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence of ints) as a plain tuple."""
    return tuple(int(dim) for dim in shape)


def _volume(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# -- logging -------------------------------------------------------------------


@functools.cache
def _collecting_logger_class(trt: Any) -> type:
    """A ``trt.ILogger`` subclass for this ``tensorrt`` module (made once per module)."""
    kept_levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: "internal_error",
        trt.ILogger.Severity.ERROR: "error",
        trt.ILogger.Severity.WARNING: "warning",
    }

    class CollectingLogger(trt.ILogger):
        """Keeps TensorRT's WARNING-and-above messages for the build log and errors.

        TensorRT calls ``log`` from any of its threads, so the list is locked. It
        keeps the last few hundred messages so a long-lived runner cannot grow it.
        The logger must outlive every TensorRT object made with it.
        """

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._messages: deque[tuple[str, str]] = deque(maxlen=_MAX_LOGGED_MESSAGES)

        def log(self, severity: Any, msg: str) -> None:
            level = kept_levels.get(severity)
            if level is None:
                _log.debug("TensorRT: %s", msg)
                return
            with self._lock:
                self._messages.append((level, str(msg)))
            _log.log(logging.WARNING if level == "warning" else logging.ERROR, "TensorRT: %s", msg)

        def messages(self) -> list[str]:
            """Every kept message as ``"level: text"``, oldest first."""
            with self._lock:
                return [f"{level}: {text}" for level, text in self._messages]

        def errors(self) -> list[str]:
            """The kept ERROR and INTERNAL_ERROR messages."""
            with self._lock:
                return [text for level, text in self._messages if level != "warning"]

        def clear(self) -> None:
            with self._lock:
                self._messages.clear()

    return CollectingLogger


def new_logger(trt: Any) -> Any:
    """A fresh collecting logger for ``trt`` (see ``_collecting_logger_class``)."""
    return _collecting_logger_class(trt)()


def _errors_or(logger: Any, fallback: str) -> str:
    errors = logger.errors()
    return "; ".join(errors[-5:]) if errors else fallback


# -- build-time helpers ----------------------------------------------------------


def _network_flags(trt: Any) -> int:
    # Strong typing takes every tensor's type from the ONNX graph: opt-in on 10.x,
    # always on (flag accepted and ignored) on 11.x.
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _parse_failure(parser: Any, logger: Any) -> EngineError:
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
            + _errors_or(logger, "it gave no reason (see the build log)"),
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


def _numpy_dtype(trt: Any, tensor_dtype: Any, what: str) -> np.dtype[Any]:
    try:
        return np.dtype(trt.nptype(tensor_dtype))
    except TypeError as exc:
        raise UnsupportedModel(
            f"{what} has TensorRT type {tensor_dtype}, which has no numpy equivalent "
            "(bfloat16 and fp8 graph inputs/outputs cannot be served; keep I/O in fp32 or fp16)"
        ) from exc


def _check_io_types(io: Sequence[tuple[str, np.dtype[Any]]], expected: Sequence[Any], kind: str) -> None:
    """Names and dtypes of engine inputs or outputs must equal the signature's."""
    names = [name for name, _ in io]
    want = {spec.name: np.dtype(spec.dtype) for spec in expected}
    if sorted(names) != sorted(want):
        raise UnsupportedModel(
            f"the TensorRT network's {kind}s {sorted(names)} differ from the model signature's {sorted(want)}"
        )
    for name, dtype in io:
        if dtype != want[name]:
            raise UnsupportedModel(
                f"{kind} '{name}' is {dtype} in the TensorRT network but {want[name]} in the "
                "signature; a reduced-precision ONNX must keep its graph inputs and outputs in "
                "their original types (e.g. convert to FP16 with keep_io_types)"
            )


def fusion_report(
    engine_information: str | Mapping[str, Any],
    network_layers: int | None,
    engine_layers: int | None = None,
) -> dict[str, Any]:
    """Which network layers TensorRT fused, from the engine inspector's JSON.

    A layer counts as fused when its name joins several with ``" + "``, its
    Metadata names more than one ONNX node, or it is a Myelin ``{ForeignNode[...]}``
    region. Reads both the 10.x (``Bindings``) and 11.x (``I/O Tensors``) layouts.
    """
    info = json.loads(engine_information) if isinstance(engine_information, str) else engine_information
    raw_layers = info.get("Layers", [])
    fused: list[dict[str, Any]] = []
    reformats = 0
    for entry in raw_layers:
        if isinstance(entry, Mapping):
            name = str(entry.get("Name", ""))
            layer_type = str(entry.get("LayerType", ""))
            metadata = str(entry.get("Metadata", "") or "")
        else:  # LAYER_NAMES_ONLY verbosity gives bare names
            name, layer_type, metadata = str(entry), "", ""
        if layer_type == "Reformat" or "Reformatting CopyNode" in name:
            reformats += 1
            continue
        nodes = _onnx_nodes(metadata)
        if " + " in name or len(nodes) > 1 or name.startswith("{ForeignNode["):
            fused.append(
                {
                    "name": name,
                    "layer_type": layer_type,
                    "nodes": nodes or [part.strip() for part in name.split(" + ")],
                }
            )
    if "I/O Tensors" in info:
        layout = "I/O Tensors"
        io_tensors = [
            str(t.get("Name", "")) if isinstance(t, Mapping) else str(t) for t in info["I/O Tensors"]
        ]
    elif "Bindings" in info:
        layout = "Bindings"
        io_tensors = [str(t.get("Name", "")) if isinstance(t, Mapping) else str(t) for t in info["Bindings"]]
    else:
        layout, io_tensors = "unknown", []
    return {
        "network_layers": network_layers,
        "engine_layers": engine_layers if engine_layers is not None else len(raw_layers),
        "fused_layer_count": len(fused),
        "fused_layers": fused,
        "reformat_layers": reformats,
        "io_tensors": io_tensors,
        "inspector_layout": layout,
    }


def _onnx_nodes(metadata: str) -> list[str]:
    # TensorRT writes "[ONNX Layer: <node name>]" per source node, joined by \x1f.
    nodes: list[str] = []
    for part in metadata.split("\x1f"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("[ONNX Layer:") and part.endswith("]"):
            part = part[len("[ONNX Layer:") : -1].strip()
        nodes.append(part)
    return nodes


# -- files -------------------------------------------------------------------------


def _write_atomically(path: Path, chunks: Sequence[bytes | memoryview]) -> int:
    """Write ``chunks`` to ``path`` through a temp file, fsync and rename; returns the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    size = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                size += handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return size


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock on ``path`` + ".lock" between processes (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def pack_artifact_header(metadata: Mapping[str, Any]) -> bytes:
    """The bytes that precede the TensorRT plan in a kiln artifact."""
    payload = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    return ARTIFACT_MAGIC + _HEADER_LENGTH.pack(len(payload)) + payload


def split_artifact(data: bytes) -> tuple[dict[str, Any] | None, memoryview]:
    """(recorded metadata or None for a bare plan, the plan bytes). Raises ``StoreCorrupted``."""
    view = memoryview(data)
    if not data.startswith(ARTIFACT_MAGIC):
        return None, view
    start = len(ARTIFACT_MAGIC) + _HEADER_LENGTH.size
    if len(data) < start:
        raise StoreCorrupted("the TensorRT artifact's header is truncated")
    (length,) = _HEADER_LENGTH.unpack_from(data, len(ARTIFACT_MAGIC))
    if start + length > len(data):
        raise StoreCorrupted("the TensorRT artifact's header is truncated")
    try:
        metadata = json.loads(bytes(view[start : start + length]))
    except ValueError as exc:
        raise StoreCorrupted(f"the TensorRT artifact's header is not JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise StoreCorrupted("the TensorRT artifact's header is not a JSON object")
    return metadata, view[start + length :]


class _TimingCacheFile:
    """The store's timing cache for one device signature, loaded before and merged after a build.

    Writers serialise on a lock file and merge with whatever another build wrote
    meanwhile, so no build's measurements are lost; the write is atomic. Problems
    with the cache never fail a build: they become warnings in the report.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.loaded_bytes = 0
        self.written_bytes = 0

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            self.warnings.append(f"could not read the timing cache: {exc}")
            return b""

    def _create(self, config: Any, saved: bytes) -> Any:
        try:
            cache = config.create_timing_cache(saved)
        except (RuntimeError, TypeError, ValueError) as exc:
            self.warnings.append(f"the timing cache could not be read, starting empty: {_first_line(exc)}")
            cache = None
        if cache is None and saved:
            cache = config.create_timing_cache(b"")
        return cache

    def attach(self, config: Any) -> None:
        """Load the saved cache into ``config`` (an empty one when there is none)."""
        saved = self._read()
        cache = self._create(config, saved)
        if cache is None:
            self.warnings.append("TensorRT could not create a timing cache; building without one")
            return
        if not config.set_timing_cache(cache, False):
            self.warnings.append("the saved timing cache does not match this device; starting empty")
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, False):
                self.warnings.append("TensorRT refused an empty timing cache; building without one")
                return
        self.loaded_bytes = len(saved)

    def save(self, config: Any) -> None:
        """Merge the build's cache with the file's latest contents and write it back."""
        try:
            with _exclusive_lock(self.path):
                cache = config.get_timing_cache()
                if cache is None:
                    return
                latest = self._read()
                if latest:
                    disk_cache = self._create(config, latest)
                    if disk_cache is not None and not cache.combine(disk_cache, False):
                        self.warnings.append("could not merge with the timing cache on disk; replacing it")
                serialized = cache.serialize()
                self.written_bytes = _write_atomically(self.path, [memoryview(serialized)])
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            self.warnings.append(f"could not save the timing cache: {_first_line(exc)}")

    def report(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "loaded_bytes": self.loaded_bytes,
            "written_bytes": self.written_bytes,
            "warnings": list(self.warnings),
        }


# -- the backend -----------------------------------------------------------------


class TensorRTBackend(Backend):
    """Builds and loads TensorRT engines on CUDA device ``device_index``.

    ``build`` runs in a build child process (one builder per thread: TensorRT
    builders are not thread-safe). ``load`` may run on any thread; the runner it
    returns serves ``instances`` concurrent ``infer`` calls.
    """

    name = "tensorrt"
    artifact_suffix = ".plan"

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        """(True, "TensorRT x.y on <GPU>") when tensorrt imports and a CUDA device is visible.

        Never raises: a broken native install can raise anything at import time.
        """
        try:
            trt = _import_tensorrt()
            version = str(trt.__version__)
        except EngineError as exc:
            return False, exc.message
        except Exception as exc:  # a broken native library fails in its own ways
            return False, f"tensorrt does not import ({_first_line(exc)})"
        try:
            count = cuda.device_count()
            if count < 1:
                return False, "no CUDA device is visible"
            gpu_name = cuda.device_properties(0).name
        except EngineError as exc:
            return False, f"TensorRT {version} imports but no CUDA device is usable ({exc.message})"
        except Exception as exc:  # cuda-python failing outside its result codes
            return False, f"TensorRT {version} imports but CUDA is not usable ({_first_line(exc)})"
        short_version = ".".join(version.split(".")[:2])
        return True, f"TensorRT {short_version} on {gpu_name}"

    def device_signature(self) -> DeviceSignature:
        """Full TensorRT version, GPU facts (see ``gpu_device_info``), OS and architecture."""
        trt = _import_tensorrt()
        info = gpu_device_info(self.device_index)
        if info is None:
            raise BackendUnavailable(f"CUDA device {self.device_index} is not visible")
        return DeviceSignature(
            backend=self.name,
            backend_version=str(trt.__version__),
            device={**info, "os": platform.system(), "arch": platform.machine()},
        )

    def build(
        self,
        onnx_path: Path,
        signature: Signature,
        options: BuildOptions,
        output_path: Path,
        *,
        timing_cache_path: Path | None = None,
        progress: ProgressCallback = no_progress,
    ) -> dict[str, Any]:
        """Build a plan from ``onnx_path`` and write header + plan to ``output_path`` atomically.

        Returns the build report: profile, builder settings, timing cache, fusion
        report and the TensorRT messages at WARNING and above. Raises
        ``UnsupportedModel`` (parser or type problems, naming nodes and operators)
        or ``BuildFailed`` (options, profile, or the builder returning no plan).
        """
        trt = _import_tensorrt()
        cuda.set_device(self.device_index)
        device = self.device_signature()
        self._check_options(options)
        logger = new_logger(trt)
        started = time.perf_counter()

        progress("parse", 0.0)
        builder = trt.Builder(logger)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        # The path lets the parser find external weights next to the model.
        parsed = parser.parse(onnx_path.read_bytes(), str(onnx_path))
        if not parsed or parser.num_errors > 0:
            raise _parse_failure(parser, logger)
        network_inputs: list[tuple[str, tuple[int, ...]]] = []
        input_types: list[tuple[str, np.dtype[Any]]] = []
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            network_inputs.append((tensor.name, _dims(tensor.shape)))
            input_types.append((tensor.name, _numpy_dtype(trt, tensor.dtype, f"input '{tensor.name}'")))
        output_types = []
        for index in range(network.num_outputs):
            tensor = network.get_output(index)
            output_types.append((tensor.name, _numpy_dtype(trt, tensor.dtype, f"output '{tensor.name}'")))
        _check_io_types(input_types, signature.inputs, "input")
        _check_io_types(output_types, signature.outputs, "output")
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
                except ValueError as exc:
                    raise BuildFailed(
                        f"TensorRT rejected the shape range of input '{name}' (min {list(low)}, "
                        f"opt {list(optimal)}, max {list(high)}): {_first_line(exc)}"
                    ) from exc
            config.add_optimization_profile(profile)
        timing_cache = _TimingCacheFile(timing_cache_path) if timing_cache_path is not None else None
        if timing_cache is not None:
            timing_cache.attach(config)

        progress("build", 0.0)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildFailed(
                "TensorRT could not build an engine: "
                + _errors_or(logger, "the builder returned no plan and logged no error"),
                details={"log": logger.messages()},
            )
        plan_view = memoryview(plan).cast("B")
        if plan_view.nbytes == 0:
            raise BuildFailed("TensorRT returned an empty plan", details={"log": logger.messages()})
        if timing_cache is not None:
            timing_cache.save(config)
        profile_report = {
            name: {"min": list(low), "opt": list(optimal), "max": list(high)}
            for name, (low, optimal, high) in profile_shapes.items()
        }
        header = pack_artifact_header(
            {
                "format": 1,
                "tensorrt_version": str(trt.__version__),
                "device_signature": device.to_dict(),
                "profile": profile_report,
            }
        )
        _write_atomically(output_path, [header, plan_view])
        build_seconds = time.perf_counter() - started
        progress("build", 1.0)

        progress("inspect", 0.0)
        fusion = self._inspect(trt, logger, plan_view, network.num_layers)
        progress("inspect", 1.0)
        return {
            "tensorrt_version": str(trt.__version__),
            "device": device.device,
            "strongly_typed": _network_flags(trt) != 0,
            "profile": profile_report,
            "builder": {
                "workspace_bytes": options.workspace_bytes,
                "optimization_level": options.optimization_level,
                "profiling_verbosity": "DETAILED",
            },
            "timing_cache": timing_cache.report() if timing_cache is not None else None,
            "plan_bytes": plan_view.nbytes,
            "build_seconds": round(build_seconds, 3),
            "fusion": fusion,
            "build_log": logger.messages(),
        }

    @staticmethod
    def _check_options(options: BuildOptions) -> None:
        if options.max_batch_size < 1:
            raise BuildFailed(f"max_batch_size must be at least 1, got {options.max_batch_size}")
        if options.workspace_bytes is not None and options.workspace_bytes <= 0:
            raise BuildFailed(f"workspace_bytes must be positive, got {options.workspace_bytes}")
        level = options.optimization_level
        if level is not None and not 0 <= level <= _MAX_OPTIMIZATION_LEVEL:
            raise BuildFailed(
                f"optimization_level must be between 0 and {_MAX_OPTIMIZATION_LEVEL} "
                f"(TensorRT's default is 3), got {level}"
            )

    @staticmethod
    def _inspect(trt: Any, logger: Any, plan: memoryview, network_layers: int) -> dict[str, Any]:
        """The fusion report of a freshly built plan; a failure here is reported, not raised."""
        try:
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                reason = _errors_or(logger, "no reason logged")
                return {"error": f"the new plan could not be deserialized for inspection: {reason}"}
            inspector = engine.create_engine_inspector()
            information = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
            return fusion_report(information, network_layers, engine.num_layers)
        except Exception as exc:  # best effort: a good engine must not fail on its report
            return {"error": f"engine inspection failed: {_first_line(exc)}"}

    def load(
        self,
        artifact_path: Path,
        signature: Signature,
        options: BuildOptions,
        *,
        instances: int = 1,
    ) -> Runner:
        """Deserialize the plan and set up ``instances`` slots.

        Raises ``StoreCorrupted`` for an unreadable plan or one recorded for another
        device signature (naming both), ``UnsupportedModel`` for engine
        I/O kiln cannot serve, ``BackendUnavailable`` without TensorRT or a device.
        """
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        trt = _import_tensorrt()
        cuda.set_device(self.device_index)
        metadata, plan = split_artifact(artifact_path.read_bytes())
        if metadata is not None:
            recorded = metadata.get("device_signature")
            current = json.loads(json.dumps(self.device_signature().to_dict()))
            if recorded != current:
                raise StoreCorrupted(
                    f"the engine {artifact_path.name} was built for "
                    f"{_describe_signature(recorded)}, this machine is "
                    f"{_describe_signature(current)}; it must be rebuilt",
                    details={"recorded": recorded, "current": current},
                )
        logger = new_logger(trt)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise StoreCorrupted(
                f"TensorRT could not deserialize the engine {artifact_path.name}: "
                + _errors_or(logger, "no reason logged"),
                details={"log": logger.messages()},
            )
        return TensorRTRunner(
            trt=trt,
            logger=logger,
            runtime=runtime,
            engine=engine,
            signature=signature,
            max_batch_size=options.max_batch_size if signature.batchable else 1,
            instances=instances,
            device_index=self.device_index,
        )


def _describe_signature(data: Any) -> str:
    if not isinstance(data, Mapping):
        return "an unknown device"
    device = data.get("device") or {}
    return (
        f"TensorRT {data.get('backend_version', '?')} on {device.get('name', '?')} "
        f"(compute {device.get('compute_capability', '?')}, "
        f"driver CUDA {device.get('driver_version', '?')}, "
        f"{device.get('os', '?')}/{device.get('arch', '?')})"
    )


# -- the runner ------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorBinding:
    """One engine I/O tensor and the largest shape a slot must hold for it."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    min_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @property
    def max_nbytes(self) -> int:
        return _volume(self.max_shape) * self.dtype.itemsize


@dataclass
class _Slot:
    """What one concurrent inference owns: a context, a stream and its buffers."""

    context: Any
    stream: cuda.Stream | None = None
    device: dict[str, cuda.DeviceBuffer] = field(default_factory=dict)
    host: dict[str, cuda.PinnedBuffer] = field(default_factory=dict)

    def release(self) -> list[str]:
        """Drop the context, free buffers, destroy the stream; returns the errors met."""
        problems: list[str] = []
        self.context = None
        buffers: list[cuda.DeviceBuffer | cuda.PinnedBuffer] = [
            *self.device.values(),
            *self.host.values(),
        ]
        for buffer in buffers:
            try:
                buffer.free()
            except cuda.CudaError as exc:
                problems.append(exc.message)
        self.device.clear()
        self.host.clear()
        if self.stream is not None:
            try:
                self.stream.destroy()
            except cuda.CudaError as exc:
                problems.append(exc.message)
            self.stream = None
        return problems


class _SlotPool:
    """A blocking pool of slots. ``close`` waits until every slot is back, then hands all over."""

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self._all = list(slots)
        self._free = list(slots)
        self._condition = threading.Condition()
        self._closed = False

    def acquire(self) -> _Slot:
        """A free slot, waiting for one. Raises ``InvalidInput`` once the pool is closed."""
        with self._condition:
            while not self._free and not self._closed:
                self._condition.wait()
            if self._closed:
                raise InvalidInput("engine is closed")
            return self._free.pop()

    def release(self, slot: _Slot) -> None:
        with self._condition:
            self._free.append(slot)
            self._condition.notify_all()

    def close(self) -> list[_Slot]:
        """Refuse new work, wait for running work to return its slots, return all slots."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            while len(self._free) < len(self._all):
                self._condition.wait()
            slots, self._all, self._free = self._all, [], []
            return slots


class TensorRTRunner(Runner):
    """Runs a deserialized TensorRT engine with a pool of execution slots.

    Owns the logger, runtime and engine it is given and every slot it makes.
    ``infer`` may be called from any thread (each thread binds the device once);
    it blocks while all slots are busy. ``close`` waits for running calls, then
    frees buffers and streams and drops the contexts before the engine.
    """

    def __init__(
        self,
        *,
        trt: Any,
        logger: Any,
        runtime: Any,
        engine: Any,
        signature: Signature,
        max_batch_size: int,
        instances: int,
        device_index: int,
    ) -> None:
        super().__init__(signature, max_batch_size)
        self._logger = logger
        self._runtime = runtime
        self._engine = engine
        self._device_index = device_index
        self._thread_state = threading.local()
        self._thread_state.device_bound = True  # load() bound the device in this thread
        inputs, output_dtypes = self._describe_io(trt)
        if signature.batchable:
            limits = [binding.max_shape[0] for binding in inputs if binding.max_shape]
            if limits:
                self.max_batch_size = min(max_batch_size, *limits)
        slots: list[_Slot] = []
        try:
            first = _Slot(context=self._create_context())
            slots.append(first)
            outputs = self._describe_outputs(first.context, inputs, output_dtypes)
            self._inputs = inputs
            self._outputs = outputs
            self._allocate(first)
            for _ in range(instances - 1):
                slot = _Slot(context=self._create_context())
                slots.append(slot)
                self._allocate(slot)
        except BaseException:
            for slot in slots:
                slot.release()
            self._engine = None
            self._runtime = None
            raise
        self._pool = _SlotPool(slots)

    # -- set-up ------------------------------------------------------------------

    def _io_names(self, trt: Any) -> tuple[list[str], list[str]]:
        engine = self._engine
        inputs, outputs = [], []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(name)
            else:
                outputs.append(name)
        return inputs, outputs

    def _describe_io(self, trt: Any) -> tuple[list[_TensorBinding], dict[str, np.dtype[Any]]]:
        """Input bindings with their profile ranges, and the output dtypes (in engine order)."""
        engine = self._engine
        input_names, output_names = self._io_names(trt)
        expected_inputs = {spec.name for spec in self.signature.inputs}
        expected_outputs = {spec.name for spec in self.signature.outputs}
        if set(input_names) != expected_inputs or set(output_names) != expected_outputs:
            raise StoreCorrupted(
                f"the engine's inputs {sorted(input_names)} and outputs {sorted(output_names)} "
                f"do not match the model's {sorted(expected_inputs)} and "
                f"{sorted(expected_outputs)}"
            )
        dtypes: dict[str, np.dtype[Any]] = {}
        for name in [*input_names, *output_names]:
            if engine.is_shape_inference_io(name):
                raise UnsupportedModel(
                    f"'{name}' is a shape tensor; kiln serves engines whose inputs and outputs are data"
                )
            dtypes[name] = _numpy_dtype(trt, engine.get_tensor_dtype(name), f"'{name}'")
        _check_io_types([(name, dtypes[name]) for name in input_names], self.signature.inputs, "input")
        _check_io_types([(name, dtypes[name]) for name in output_names], self.signature.outputs, "output")
        bindings = []
        for name in input_names:
            shape = _dims(engine.get_tensor_shape(name))
            if DYNAMIC in shape:
                low, _, high = (_dims(dims) for dims in engine.get_tensor_profile_shape(name, 0))
            else:
                low = high = shape
            bindings.append(_TensorBinding(name, True, dtypes[name], low, high))
        return bindings, {name: dtypes[name] for name in output_names}

    def _create_context(self) -> Any:
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(
                "TensorRT could not create an execution context (out of GPU memory?): "
                + _errors_or(self._logger, "no reason logged")
            )
        return context

    def _describe_outputs(
        self,
        context: Any,
        inputs: Sequence[_TensorBinding],
        output_dtypes: Mapping[str, np.dtype[Any]],
    ) -> list[_TensorBinding]:
        """Output bindings sized by the output shapes at the profile's largest input shapes."""
        for binding in inputs:
            if not context.set_input_shape(binding.name, binding.max_shape):
                raise StoreCorrupted(
                    f"the engine refused its own maximum shape {list(binding.max_shape)} for "
                    f"input '{binding.name}': " + _errors_or(self._logger, "no reason logged")
                )
        unresolved = context.infer_shapes()
        if unresolved:
            raise UnsupportedModel(f"TensorRT cannot infer the shapes of {sorted(unresolved)}")
        outputs = []
        for name, dtype in output_dtypes.items():
            shape = _dims(context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise UnsupportedModel(
                    f"output '{name}' has a data-dependent shape {list(shape)} (e.g. NonZero or "
                    "NonMaxSuppression); the TensorRT runner needs output shapes that follow from "
                    "the input shapes"
                )
            outputs.append(_TensorBinding(name, False, dtype, shape, shape))
        return outputs

    def _allocate(self, slot: _Slot) -> None:
        slot.stream = cuda.Stream()
        for binding in [*self._inputs, *self._outputs]:
            slot.device[binding.name] = cuda.DeviceBuffer(binding.max_nbytes)
            slot.host[binding.name] = cuda.PinnedBuffer(binding.max_nbytes)

    def _bind_device(self) -> None:
        # CUDA's current device is per thread; bind it once in each calling thread.
        if not getattr(self._thread_state, "device_bound", False):
            cuda.set_device(self._device_index)
            self._thread_state.device_bound = True

    # -- inference ---------------------------------------------------------------

    def _check_ranges(self, feeds: Mapping[str, np.ndarray]) -> None:
        for binding in self._inputs:
            shape = feeds[binding.name].shape
            for axis, (size, low, high) in enumerate(
                zip(shape, binding.min_shape, binding.max_shape, strict=True)
            ):
                if not low <= size <= high:
                    raise InvalidInput(
                        f"input '{binding.name}' has shape {list(shape)}: dimension {axis} must be "
                        f"within {low}..{high} for this engine (its profile spans "
                        f"{list(binding.min_shape)} to {list(binding.max_shape)})"
                    )

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_ranges(feeds)
        self._bind_device()
        slot = self._pool.acquire()
        try:
            return self._run(slot, feeds)
        finally:
            self._pool.release(slot)

    def _run(self, slot: _Slot, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        context = slot.context
        stream = slot.stream
        assert stream is not None
        for binding in self._inputs:
            shape = tuple(feeds[binding.name].shape)
            if not context.set_input_shape(binding.name, shape):
                raise InvalidInput(
                    f"TensorRT refused shape {list(shape)} for input '{binding.name}': "
                    + _errors_or(self._logger, "outside the engine's profile")
                )
        unresolved = context.infer_shapes()
        if unresolved:
            raise TensorRTExecutionError(f"TensorRT could not infer the shapes of {sorted(unresolved)}")
        for binding in [*self._inputs, *self._outputs]:
            context.set_tensor_address(binding.name, slot.device[binding.name].ptr)
        try:
            for binding in self._inputs:
                array = feeds[binding.name]
                host = slot.host[binding.name].view(binding.dtype, tuple(array.shape))
                np.copyto(host, array, casting="no")
                cuda.memcpy_htod_async(
                    slot.device[binding.name].ptr, slot.host[binding.name].ptr, host.nbytes, stream
                )
            if not context.execute_async_v3(stream.handle):
                raise TensorRTExecutionError(
                    "TensorRT failed to enqueue the batch: " + _errors_or(self._logger, "no reason logged")
                )
            shapes = {}
            for binding in self._outputs:
                shape = _dims(context.get_tensor_shape(binding.name))
                nbytes = _volume(shape) * binding.dtype.itemsize
                if any(dim < 0 for dim in shape) or nbytes > binding.max_nbytes:
                    raise TensorRTExecutionError(
                        f"output '{binding.name}' came out with shape {list(shape)}, beyond the "
                        f"{list(binding.max_shape)} its buffer was sized for"
                    )
                shapes[binding.name] = shape
                cuda.memcpy_dtoh_async(
                    slot.host[binding.name].ptr, slot.device[binding.name].ptr, nbytes, stream
                )
            stream.synchronize()
        except BaseException:
            # The slot goes back to the pool: nothing of this call may still be in flight.
            try:
                stream.synchronize()
            except cuda.CudaError as exc:
                _log.error("could not drain a TensorRT stream after a failed batch: %s", exc.message)
            raise
        return {
            binding.name: slot.host[binding.name].view(binding.dtype, shapes[binding.name]).copy()
            for binding in self._outputs
        }

    # -- shutdown ----------------------------------------------------------------

    def _close(self) -> None:
        slots = self._pool.close()
        problems: list[str] = []
        try:
            self._bind_device()
        except cuda.CudaError as exc:
            problems.append(exc.message)
        for slot in slots:
            problems.extend(slot.release())
        # Contexts are gone with their slots; the engine goes before the runtime.
        self._engine = None
        self._runtime = None
        if problems:
            _log.warning("closing a TensorRT runner: %s", "; ".join(problems))
