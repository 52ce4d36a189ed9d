"""What every part of the TensorRT backend shares: the lazy import, the logger, small helpers.

``tensorrt`` is imported lazily, inside functions, always under the local name
``trt`` (the static API check in the tests relies on that).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import re
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from engines.errors import BackendUnavailable, UnsupportedModel

_log = logging.getLogger("engines.backends.tensorrt")

_MAX_LOGGED_MESSAGES = 500


def import_tensorrt() -> Any:
    """The ``tensorrt`` module. Raises ``BackendUnavailable`` when it does not import."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"tensorrt does not import ({first_line(exc)}); install kiln with the 'gpu' extra "
            "on a machine with an NVIDIA GPU"
        ) from exc
    return trt


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


_FLAVOURED_DISTRIBUTION = re.compile(r"^tensorrt[-_](cu\d+)(?:[-_](?:bindings|libs))?$", re.IGNORECASE)


def _installed_distributions() -> list[tuple[str, str]]:
    return [(str(d.metadata["Name"] or ""), str(d.version)) for d in importlib.metadata.distributions()]


@functools.cache
def cuda_flavour(tensorrt_version: str) -> str:
    """The CUDA major the installed TensorRT was built for: ``"cu12"`` or ``"cu13"``.

    ``tensorrt_cu12`` and ``tensorrt_cu13`` of one release share ``__version__``
    but make different plans, so the pip distribution that installed this version
    says which. ``"unknown"`` for installs without one (e.g. NVIDIA's containers,
    where the image fixes the CUDA version anyway).
    """
    for name, version in _installed_distributions():
        found = _FLAVOURED_DISTRIBUTION.match(name)
        if found and version == tensorrt_version:
            return found.group(1).lower()
    return "unknown"


def dims(shape: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence of ints) as a plain tuple."""
    return tuple(int(dim) for dim in shape)


def volume(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


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
            self._calls = threading.local()

        def log(self, severity: Any, msg: str) -> None:
            level = kept_levels.get(severity)
            if level is None:
                _log.debug("TensorRT: %s", msg)
                return
            with self._lock:
                self._messages.append((level, str(msg)))
            if level != "warning":
                for call in getattr(self._calls, "active", ()):
                    call.errors.append(str(msg))
            _log.log(logging.WARNING if level == "warning" else logging.ERROR, "TensorRT: %s", msg)

        @contextlib.contextmanager
        def capture(self) -> Iterator[CallLog]:
            """The ERROR messages logged by this thread while the block runs.

            TensorRT logs a runtime call's errors from the calling thread, during
            the call, so this is that call's reason and no other call's.
            """
            call = CallLog()
            active = getattr(self._calls, "active", None)
            if active is None:
                active = self._calls.active = []
            active.append(call)
            try:
                yield call
            finally:
                active.remove(call)

        def messages(self) -> list[str]:
            """Every kept message as ``"level: text"``, oldest first."""
            with self._lock:
                return [f"{level}: {text}" for level, text in self._messages]

        def errors(self) -> list[str]:
            """The kept ERROR and INTERNAL_ERROR messages."""
            with self._lock:
                return [text for level, text in self._messages if level != "warning"]

    return CollectingLogger


class CallLog:
    """What TensorRT logged at ERROR and above during one call (see ``capture``)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def errors_or(self, fallback: str) -> str:
        return "; ".join(self.errors[-5:]) if self.errors else fallback


def new_logger(trt: Any) -> Any:
    """A fresh collecting logger for ``trt`` (see ``_collecting_logger_class``)."""
    return _collecting_logger_class(trt)()


def errors_or(logger: Any, fallback: str) -> str:
    """The last errors of a logger made for one build or load, or ``fallback``."""
    errors = logger.errors()
    return "; ".join(errors[-5:]) if errors else fallback


def io_names(trt: Any, engine: Any) -> tuple[list[str], list[str]]:
    """An engine's input and output tensor names, each in engine order."""
    inputs: list[str] = []
    outputs: list[str] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
    return inputs, outputs


def numpy_dtype(trt: Any, tensor_dtype: Any, what: str) -> np.dtype[Any]:
    try:
        return np.dtype(trt.nptype(tensor_dtype))
    except TypeError as exc:
        raise UnsupportedModel(
            f"{what} has TensorRT type {tensor_dtype}, which has no numpy equivalent "
            "(bfloat16 and fp8 graph inputs/outputs cannot be served; keep I/O in fp32 or fp16)"
        ) from exc


def check_io_types(io: Sequence[tuple[str, np.dtype[Any]]], expected: Sequence[Any], kind: str) -> None:
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
