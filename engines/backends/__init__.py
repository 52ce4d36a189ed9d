"""Backends and the rule that picks one.

``select_backend("auto")`` prefers TensorRT when it imports and a GPU is visible,
else ONNX Runtime; it never raises for a missing library and says why it chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engines.backends.base import Backend, Runner
from engines.errors import BackendUnavailable

BACKEND_NAMES = ("onnxruntime", "tensorrt")


def backend_class(name: str) -> type[Backend]:
    """The class of a backend by name; imports nothing heavy."""
    if name == "onnxruntime":
        from engines.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "tensorrt":
        from engines.backends.tensorrt import TensorRTBackend

        return TensorRTBackend
    raise BackendUnavailable(f"unknown backend '{name}'; choose one of auto, {', '.join(BACKEND_NAMES)}")


def select_backend(
    choice: str = "auto", options: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[Backend, str]:
    """Return a backend instance and a one-line reason for the choice.

    ``choice`` is ``auto``, ``onnxruntime`` or ``tensorrt``; ``options`` maps a
    backend name to its constructor's keyword arguments. An explicit choice that
    cannot run here raises ``BackendUnavailable`` with the probe's reason.
    """
    options = options or {}

    def make(name: str) -> Backend:
        return backend_class(name)(**options.get(name, {}))

    if choice == "auto":
        trt_ok, trt_reason = backend_class("tensorrt").probe()
        if trt_ok:
            return make("tensorrt"), f"auto: tensorrt ({trt_reason})"
        ort_ok, ort_reason = backend_class("onnxruntime").probe()
        if not ort_ok:
            raise BackendUnavailable(f"no backend can run here: {trt_reason}; {ort_reason}")
        return make("onnxruntime"), f"auto: onnxruntime, since {trt_reason}"
    ok, reason = backend_class(choice).probe()
    if not ok:
        raise BackendUnavailable(f"backend '{choice}' cannot run here: {reason}")
    return make(choice), f"{choice} (requested): {reason}"


__all__ = ["BACKEND_NAMES", "Backend", "Runner", "backend_class", "select_backend"]
