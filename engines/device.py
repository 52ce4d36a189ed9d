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
    model = platform.processor() or ""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model.strip():
                model = value.strip()
            elif key in ("model name",) and model == platform.processor():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {
        "kind": "cpu",
        "arch": platform.machine(),
        "model": model.strip(),
        "isa": sorted(flag for flag in _CPU_FLAGS_OF_INTEREST if flag in flags),
    }
