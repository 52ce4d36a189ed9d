"""The baseline engine: the uploaded model as it is (FP32), on ONNX Runtime.

A version serves on it within seconds of its upload while its optimized engine
(TensorRT, or a reduced-precision ONNX Runtime candidate) builds. It is loaded
straight from the stored ONNX: no build, no artifact, no accuracy gate (it is
the reference the gate measures against).

Where ONNX Runtime has the CUDA execution provider (``onnxruntime-gpu``) it runs
there, with the settings that start quickest; elsewhere, or when the CUDA provider
cannot start on this machine, on the CPU. On the CPU, ONNX Runtime's highest graph
optimization level starts as fast as the basic one (creating a YOLOv8n session and
running it once: 64 vs 59 ms here, within noise) and runs a third faster, so the
baseline uses the same session settings as the CPU backend.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner
from engines.errors import StoreCorrupted, UnsupportedModel
from engines.types import BuildOptions, Signature

log = logging.getLogger("kiln.engines")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
BASELINE_BACKEND = "onnxruntime"
BASELINE_PRECISION = "fp32"

# CUDA provider options for a quick, FP32-exact start:
# - the default "EXHAUSTIVE" cuDNN search times every convolution algorithm on the
#   first run of each shape; the heuristic picks one at once;
# - TF32 matmuls would make the baseline differ from the FP32 reference it stands for;
# - the arena grows by what is asked, not by doubling, which keeps the memory held
#   while the baseline and the optimized engine coexist close to what it needs.
CUDA_QUICK_START = {
    "cudnn_conv_algo_search": "HEURISTIC",
    "use_tf32": "0",
    "arena_extend_strategy": "kSameAsRequested",
}


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def baseline_providers(available: Sequence[str]) -> list[Any]:
    """ONNX Runtime providers for the baseline, in order of preference: the CUDA
    provider (with quick-start options) then the CPU when ``available`` lists it,
    else the CPU alone."""
    if CUDA_PROVIDER in available:
        return [(CUDA_PROVIDER, dict(CUDA_QUICK_START)), CPU_PROVIDER]
    return [CPU_PROVIDER]


def load_baseline(
    model_path: Path,
    signature: Signature,
    options: BuildOptions,
    *,
    backend: OnnxRuntimeBackend | None = None,
    instances: int = 1,
) -> OnnxRuntimeRunner:
    """Load the model at ``model_path`` as a baseline runner; its ``provider`` says
    where it runs. ``backend`` supplies the CPU session settings (threads, sessions
    per instance). Raises ``UnsupportedModel`` when ONNX Runtime cannot load it."""
    backend = backend or OnnxRuntimeBackend()
    providers = baseline_providers(available_providers())
    try:
        return backend.load(model_path, signature, options, instances=instances, providers=providers)
    except StoreCorrupted as exc:
        failure = exc
    if providers != [CPU_PROVIDER]:
        # Listed but unable to start here (no device, a CUDA or cuDNN library missing).
        log.warning("the CUDA provider cannot start (%s); the baseline runs on the CPU", failure.message)
        try:
            return backend.load(model_path, signature, options, instances=instances, providers=[CPU_PROVIDER])
        except StoreCorrupted as exc:
            failure = exc
    raise UnsupportedModel(failure.message.replace("the engine", "the model")) from failure
