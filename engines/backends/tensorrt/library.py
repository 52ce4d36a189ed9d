"""What every part of the TensorRT backend shares: the lazy import, the logger, small helpers.

``tensorrt`` is imported lazily, inside functions, always under the local name
``trt`` (the static API check in the tests relies on that).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Sequence
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


def errors_or(logger: Any, fallback: str) -> str:
    errors = logger.errors()
    return "; ".join(errors[-5:]) if errors else fallback


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
