"""Backends and the rule that picks one.

``select_backend("auto")`` prefers TensorRT when it imports and a GPU is usable,
else ONNX Runtime; it never raises for a missing library and says why it chose.
When a GPU is visible but TensorRT cannot use it (no TensorRT, a driver too old
for cuda-python), it logs a warning saying so instead of serving quietly on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.backends.base import Backend, Runner
from engines.errors import BackendUnavailable

BACKEND_NAMES = ("onnxruntime", "tensorrt")

_log = logging.getLogger(__name__)


def gpu_visible() -> bool:
    """Whether the NVIDIA kernel driver shows this machine (or container) a GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


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

    def probe(name: str) -> tuple[bool, str]:
        if name == "tensorrt":  # the device it will use, not device 0
            from engines.backends.tensorrt import TensorRTBackend

            return TensorRTBackend.probe(device_index=int(options.get(name, {}).get("device_index", 0)))
        return backend_class(name).probe()

    if choice == "auto":
        trt_ok, trt_reason = probe("tensorrt")
        if trt_ok:
            return make("tensorrt"), f"auto: tensorrt ({trt_reason})"
        ort_ok, ort_reason = probe("onnxruntime")
        if not ort_ok:
            raise BackendUnavailable(f"no backend can run here: {trt_reason}; {ort_reason}")
        if gpu_visible():
            _log.warning(
                "a GPU is visible but TensorRT cannot use it: %s. Serving on the CPU with ONNX Runtime; "
                "set backend=tensorrt to fail instead (docs/GPU.md)",
                trt_reason,
            )
        return make("onnxruntime"), f"auto: onnxruntime, since {trt_reason}"
    ok, reason = probe(choice)
    if not ok:
        raise BackendUnavailable(f"backend '{choice}' cannot run here: {reason}")
    return make(choice), f"{choice} (requested): {reason}"


__all__ = ["BACKEND_NAMES", "Backend", "Runner", "backend_class", "select_backend"]
