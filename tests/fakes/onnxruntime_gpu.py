"""onnxruntime-gpu as it behaves on a GPU host, on top of the CPU onnxruntime installed
here: the CUDA provider is listed, sessions take the providers they are given and
report them as in use. Outputs are real: a CPU session computes them."""

from __future__ import annotations

from typing import Any, ClassVar

import onnxruntime
import pytest

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class GpuOrtSession:
    """``onnxruntime.InferenceSession`` of onnxruntime-gpu. ``created`` records the
    providers of every session; with ``fail_on_cuda`` a session asked for the CUDA
    provider raises as ONNX Runtime does on a host without a usable GPU."""

    created: ClassVar[list[list[Any]]] = []
    fail_on_cuda: ClassVar[bool] = False
    real_session = onnxruntime.InferenceSession

    def __init__(self, path: str, sess_options: Any = None, providers: list[Any] | None = None) -> None:
        providers = list(providers or [CPU_PROVIDER])
        GpuOrtSession.created.append(providers)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if CUDA_PROVIDER in names and GpuOrtSession.fail_on_cuda:
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        self._names = names
        self._session = GpuOrtSession.real_session(path, sess_options, providers=[CPU_PROVIDER])

    def get_providers(self) -> list[str]:
        return self._names

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def install_fake_onnxruntime_gpu(monkeypatch: pytest.MonkeyPatch) -> type[GpuOrtSession]:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(onnxruntime, "InferenceSession", GpuOrtSession)
    GpuOrtSession.created = []
    GpuOrtSession.fail_on_cuda = False
    return GpuOrtSession
