"""Install the fake GPU stack into ``sys.modules`` for one test (through ``monkeypatch``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from tests.fakes.cudart import FakeCudaRuntime
from tests.fakes.pynvml import FakeNvml, FakeNvmlDevice
from tests.fakes.tensorrt import FakeTensorRT

TENSORRT_10 = "10.16.1.11"
TENSORRT_11 = "11.4.0.106"


@dataclass
class FakeGpu:
    """A fake CUDA runtime and a fake TensorRT bound to it."""

    cudart: FakeCudaRuntime
    trt: FakeTensorRT

    def violations(self) -> list[str]:
        return [*self.cudart.violations, *self.trt.violations]


def install_fake_cuda(
    monkeypatch: pytest.MonkeyPatch, cudart: FakeCudaRuntime | None = None
) -> FakeCudaRuntime:
    cudart = cudart or FakeCudaRuntime()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart.module)
    return cudart


def install_fake_gpu(
    monkeypatch: pytest.MonkeyPatch,
    *,
    tensorrt_version: str = TENSORRT_11,
    cudart: FakeCudaRuntime | None = None,
) -> FakeGpu:
    cudart = install_fake_cuda(monkeypatch, cudart)
    trt = FakeTensorRT(tensorrt_version, cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module)
    return FakeGpu(cudart, trt)


def install_fake_nvml(
    monkeypatch: pytest.MonkeyPatch, devices: list[FakeNvmlDevice], *, init_error: int | None = None
) -> FakeNvml:
    nvml = FakeNvml(devices, init_error=init_error)
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module)
    return nvml
