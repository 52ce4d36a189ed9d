"""Gates for the tests that need a real NVIDIA GPU: each skips with the reason elsewhere."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def cuda_device() -> int:
    """Index 0 of a visible CUDA device, through the real cuda-python; skips without one."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (pip install '.[gpu]')")
    from engines.backends import cuda
    from engines.errors import EngineError

    try:
        count = cuda.device_count()
    except EngineError as exc:
        pytest.skip(f"no usable CUDA device: {exc.message}")
    if count < 1:
        pytest.skip("no CUDA device is visible")
    cuda.set_device(0)
    return 0


@pytest.fixture(scope="session")
def tensorrt(cuda_device: int) -> Any:
    """The real tensorrt module on a machine with a GPU; skips without either."""
    return pytest.importorskip(
        "tensorrt", reason="TensorRT is not installed (pip install '.[gpu]' on a machine with an NVIDIA GPU)"
    )


@pytest.fixture(scope="session")
def nvml() -> Any:
    """The real pynvml, initialized; skips without nvidia-ml-py or an NVIDIA driver."""
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"NVML does not start here (no NVIDIA driver?): {exc}")
    yield pynvml
    pynvml.nvmlShutdown()
