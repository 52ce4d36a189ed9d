"""engines.backends.cuda against a fake cuda.bindings.runtime, and the real one without a GPU."""

from __future__ import annotations

import importlib.util
import sys
import threading

import numpy as np
import pytest

from engines.backends import cuda
from engines.device import gpu_device_info
from engines.errors import BackendUnavailable, DeviceLost
from tests.fakes.cudart import FakeCudaRuntime, FakeDeviceProperties, cudaError_t
from tests.fakes.install import install_fake_cuda


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch):
    fake = install_fake_cuda(monkeypatch)
    cuda.set_device(0)
    yield fake
    assert fake.violations == []


def test_check_returns_results_and_raises_named_errors(cudart: FakeCudaRuntime) -> None:
    assert cuda.check((cudaError_t.cudaSuccess,)) is None
    assert cuda.check((cudaError_t.cudaSuccess, 7)) == 7
    assert cuda.check((cudaError_t.cudaSuccess, 1, 2)) == (1, 2)
    with pytest.raises(
        cuda.CudaError,
        match=r"cudaMalloc\(64\) failed: cudaErrorMemoryAllocation \(out of memory\)",
    ):
        cuda.check((cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(64)")
    try:
        cuda.check((cudaError_t.cudaErrorNoDevice, None))
    except cuda.CudaError as exc:
        assert exc.details["error"] == "cudaErrorNoDevice"
        assert exc.kind == "cuda_error"


def test_sticky_errors_are_device_lost_and_others_are_not(cudart: FakeCudaRuntime) -> None:
    cudart.fail_calls["cudaMalloc"] = cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(cuda.CudaError) as plain:
        cuda.DeviceBuffer(16)
    assert not isinstance(plain.value, DeviceLost)
    del cudart.fail_calls["cudaMalloc"]
    cudart.fault(cudaError_t.cudaErrorIllegalAddress)
    with pytest.raises(DeviceLost, match="cudaErrorIllegalAddress") as lost:
        cuda.DeviceBuffer(16)
    assert isinstance(lost.value, cuda.CudaError) and lost.value.kind == "device_lost"


def test_device_facts(cudart: FakeCudaRuntime) -> None:
    assert cuda.device_count() == 1
    props = cuda.device_properties(0)
    assert props == cuda.DeviceProperties("NVIDIA Fake H100 80GB HBM3", (9, 0), 80 * 1024**3, 132)
    assert cuda.driver_version() == "13.0"
    cudart.runtime_version = 12080
    assert cuda.runtime_version() == "12.8"


def test_device_name_is_cut_at_the_first_nul(monkeypatch: pytest.MonkeyPatch) -> None:
    # cudaDeviceProp.name is a fixed char[256]; older bindings hand back the padding.
    install_fake_cuda(monkeypatch, FakeCudaRuntime([FakeDeviceProperties(name=b"NVIDIA L4\0\0\0garbage")]))
    assert cuda.device_properties(0).name == "NVIDIA L4"


def test_buffers_and_stream_round_trip_through_fake_device_memory(cudart: FakeCudaRuntime) -> None:
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    with (
        cuda.Stream() as stream,
        cuda.DeviceBuffer(data.nbytes) as device,
        cuda.PinnedBuffer(data.nbytes) as upload,
        cuda.PinnedBuffer(data.nbytes) as download,
    ):
        assert stream.handle != 0
        upload.view(np.float32, data.shape)[...] = data
        cuda.memcpy_htod_async(device.ptr, upload.ptr, data.nbytes, stream)
        cuda.memcpy_dtoh_async(download.ptr, device.ptr, data.nbytes, stream)
        # Queued work runs at synchronize: before it, nothing has arrived.
        assert not download.view(np.float32, data.shape).any()
        stream.synchronize()
        np.testing.assert_array_equal(download.view(np.float32, data.shape), data)
    assert cudart.live() == {"device": 0, "pinned": 0, "streams": 0}


def test_free_and_destroy_are_idempotent(cudart: FakeCudaRuntime) -> None:
    buffer, pinned, stream = cuda.DeviceBuffer(16), cuda.PinnedBuffer(16), cuda.Stream()
    for _ in range(2):
        buffer.free()
        pinned.free()
        stream.destroy()
    assert cudart.live() == {"device": 0, "pinned": 0, "streams": 0}
    with pytest.raises(cuda.CudaError, match="after it was freed"):
        pinned.view(np.uint8, (4,))
    with pytest.raises(cuda.CudaError, match="after it was destroyed"):
        stream.synchronize()


def test_pinned_view_refuses_shapes_beyond_the_buffer(cudart: FakeCudaRuntime) -> None:
    with cuda.PinnedBuffer(16) as pinned, pytest.raises(ValueError, match="needs 32 bytes"):
        pinned.view(np.float32, (8,))


def test_allocation_failure_is_a_cuda_error(cudart: FakeCudaRuntime) -> None:
    cudart.fail_calls["cudaMalloc"] = cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(1 << 30)


def test_a_thread_that_skips_set_device_is_caught(cudart: FakeCudaRuntime) -> None:
    errors: list[BaseException] = []

    def allocate_without_binding() -> None:
        try:
            cuda.DeviceBuffer(8)
        except cuda.CudaError as exc:
            errors.append(exc)

    worker = threading.Thread(target=allocate_without_binding)
    worker.start()
    worker.join()
    assert len(errors) == 1
    assert cudart.violations == ["cudaMalloc in a thread that never called cudaSetDevice"]
    cudart.violations.clear()


def test_gpu_device_info_with_a_fake_gpu(cudart: FakeCudaRuntime) -> None:
    assert gpu_device_info(0) == {
        "kind": "gpu",
        "name": "NVIDIA Fake H100 80GB HBM3",
        "compute_capability": "9.0",
        "total_memory_bytes": 80 * 1024**3,
        "multiprocessor_count": 132,
    }
    assert gpu_device_info(1) is None


def test_gpu_device_info_is_none_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_cuda(
        monkeypatch, FakeCudaRuntime(device_count_error=cudaError_t.cudaErrorInsufficientDriver)
    )
    assert gpu_device_info() is None


def test_missing_cuda_python_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(BackendUnavailable, match="cuda-python is not installed"):
        cuda.device_count()
    assert gpu_device_info() is None


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python is not installed")
def test_real_cuda_python_without_a_gpu_reports_instead_of_crashing() -> None:
    """On a machine without a GPU the real bindings import and every call returns an error."""
    try:
        count = cuda.device_count()
    except cuda.CudaError as exc:
        assert exc.details["error"].startswith("cudaError")
        assert gpu_device_info() is None
    else:  # a machine with a GPU
        assert count >= 1
        assert gpu_device_info() is not None
