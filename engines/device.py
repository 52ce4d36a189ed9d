"""Device signatures: the facts an engine artifact is tied to.

An engine is only valid on the device (and backend version) it was built for, so
the signature is part of every engine's cache key.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path
from typing import Any

# ISA extensions that change which kernels ONNX Runtime picks (and so the
# optimized graph it saves): an engine built with them must not be reused without.
_CPU_FLAGS_OF_INTEREST = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
    "amx_tile",
    "asimd",
    "sve",
)


@cache
def cpu_device_info() -> dict[str, Any]:
    """CPU model name, architecture and the ISA flags that matter for kernels."""
    model = ""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    model = model or platform.processor()
    return {
        "kind": "cpu",
        "arch": platform.machine(),
        "model": model.strip(),
        "isa": sorted(flag for flag in _CPU_FLAGS_OF_INTEREST if flag in flags),
    }


def gpu_device_info(device_index: int = 0) -> dict[str, Any] | None:
    """The facts a TensorRT engine built on GPU ``device_index`` is tied to, or None.

    Returns name, compute capability, total memory and SM count: the GPU a plan was
    tuned for. Not the driver's CUDA version nor cuda-python's runtime version: a
    plan depends on TensorRT and the GPU, not on them (TensorRT support matrix,
    "Engine portability"), and an upgrade of either must not rebuild every engine.
    None when cuda-python is missing, no driver or device is visible, or the index
    is out of range: never raises for that. Not cached, so a process sees a driver
    that appears after start-up.
    """
    from engines.backends import cuda
    from engines.errors import BackendUnavailable

    try:
        if device_index >= cuda.device_count():
            return None
        props = cuda.device_properties(device_index)
    except (BackendUnavailable, cuda.CudaError):
        return None
    major, minor = props.compute_capability
    return {
        "kind": "gpu",
        "name": props.name,
        "compute_capability": f"{major}.{minor}",
        "total_memory_bytes": props.total_memory_bytes,
        "multiprocessor_count": props.multiprocessor_count,
    }
