"""engines.backends.cuda on a real GPU: buffers, streams and copies round trip."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engines.backends import cuda
from engines.device import gpu_device_info

pytestmark = pytest.mark.gpu


def test_device_facts(cuda_device: int) -> None:
    info = gpu_device_info(cuda_device)
    assert info is not None
    assert info["name"]
    assert info["total_memory_bytes"] > 0
    assert info["multiprocessor_count"] > 0
    major, minor = (int(part) for part in info["compute_capability"].split("."))
    assert major >= 5 and minor >= 0


def test_host_to_device_to_host_round_trip(cuda_device: int) -> None:
    data = np.random.default_rng(0).standard_normal((64, 257)).astype(np.float32)
    with (
        cuda.Stream() as stream,
        cuda.DeviceBuffer(data.nbytes) as device,
        cuda.PinnedBuffer(data.nbytes) as upload,
        cuda.PinnedBuffer(data.nbytes) as download,
    ):
        upload.view(np.float32, data.shape)[...] = data
        cuda.memcpy_htod_async(device.ptr, upload.ptr, data.nbytes, stream)
        cuda.memcpy_dtoh_async(download.ptr, device.ptr, data.nbytes, stream)
        stream.synchronize()
        np.testing.assert_array_equal(download.view(np.float32, data.shape), data)


def test_round_trips_from_several_threads(cuda_device: int) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            cuda.set_device(cuda_device)
            data = np.full(1 << 16, seed, dtype=np.int32)
            with (
                cuda.Stream() as stream,
                cuda.DeviceBuffer(data.nbytes) as device,
                cuda.PinnedBuffer(data.nbytes) as host,
            ):
                for _ in range(20):
                    host.view(np.int32, data.shape)[...] = data
                    cuda.memcpy_htod_async(device.ptr, host.ptr, data.nbytes, stream)
                    host.view(np.int32, data.shape)[...] = -1
                    cuda.memcpy_dtoh_async(host.ptr, device.ptr, data.nbytes, stream)
                    stream.synchronize()
                    np.testing.assert_array_equal(host.view(np.int32, data.shape), data)
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []


def test_an_impossible_allocation_is_a_cuda_error(cuda_device: int) -> None:
    with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(1 << 60)
