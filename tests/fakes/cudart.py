"""A fake ``cuda.bindings.runtime``: result tuples, fake device memory, streams that run at sync.

Device memory is a set of ``bytearray`` allocations at made-up addresses; pinned
host memory is real host memory (ctypes buffers), because the code under test
wraps it in numpy through its address. Work queued on a stream (copies, kernels
queued by the fake TensorRT) runs only when the stream is synchronized, so code
that reads results before syncing gets stale bytes, as on a GPU.

Rules enforced (each breach is recorded in ``violations`` and fails the call):
a thread must call ``cudaSetDevice`` before allocating, copying or using streams
(the current device is per thread: CUDA Runtime API ``cudaSetDevice``); async
copies go between pinned host memory and live device allocations, within bounds
(an out-of-bounds device access is undefined on a GPU), on a live non-default
stream (``cudaStreamNonBlocking`` streams, CUDA Runtime API "Stream
synchronization behavior"); nothing is freed twice (``cudaFree``:
cudaErrorInvalidValue).

Sticky errors: after ``fault(error)`` with an error the CUDA Runtime API documents
as leaving "the process in an inconsistent state and any further CUDA work will
return the same error" (cudaErrorIllegalAddress, cudaErrorLaunchFailure, the
other kernel exceptions; cudaErrorECCUncorrectable poisons the context the same
way), every later call returns that error, as the real runtime does until the
process exits.

Stricter than the real runtime, on purpose and harmlessly (TRT_AUDIT.md): pageable
host memory in async copies is refused (the real one copies it synchronously), and
``cudaSetDevice`` is required (the real one falls back to device 0).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class cudaError_t(enum.IntEnum):  # the real enum's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorECCUncorrectable = 214
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719


_ERROR_TEXT = {
    cudaError_t.cudaSuccess: b"no error",
    cudaError_t.cudaErrorInvalidValue: b"invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: b"out of memory",
    cudaError_t.cudaErrorInsufficientDriver: (
        b"CUDA driver version is insufficient for CUDA runtime version"
    ),
    cudaError_t.cudaErrorNoDevice: b"no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidDevice: b"invalid device ordinal",
    cudaError_t.cudaErrorInvalidResourceHandle: b"invalid resource handle",
    cudaError_t.cudaErrorLaunchFailure: b"unspecified launch failure",
    cudaError_t.cudaErrorIllegalAddress: b"an illegal memory access was encountered",
    cudaError_t.cudaErrorECCUncorrectable: b"uncorrectable ECC error encountered",
}
STICKY_ERRORS = {
    cudaError_t.cudaErrorIllegalAddress,
    cudaError_t.cudaErrorLaunchFailure,
    cudaError_t.cudaErrorECCUncorrectable,
}


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:
    """A stream handle: an int address, like cuda-python's object."""

    def __init__(self, address: int = 0) -> None:
        self._address = int(address)

    def __int__(self) -> int:
        return self._address

    def __index__(self) -> int:
        return self._address

    def __repr__(self) -> str:
        return f"<cudaStream_t {self._address:#x}>"


@dataclass
class FakeDeviceProperties:
    """The fields of ``cudaDeviceProp`` that kiln reads."""

    name: bytes = b"NVIDIA Fake H100 80GB HBM3"
    major: int = 9
    minor: int = 0
    totalGlobalMem: int = 80 * 1024**3
    multiProcessorCount: int = 132


@dataclass
class _Allocation:
    address: int
    data: bytearray


@dataclass
class _FakeStream:
    handle: int
    queue: list[Callable[[], None]] = field(default_factory=list)


class FakeCudaRuntime:
    """State behind one fake ``cuda.bindings.runtime`` module (``self.module``)."""

    def __init__(
        self,
        devices: list[FakeDeviceProperties] | None = None,
        *,
        device_count_error: cudaError_t | None = None,
        driver_version: int = 13000,
        runtime_version: int = 13000,
    ) -> None:
        self.devices = [FakeDeviceProperties()] if devices is None else devices
        self.device_count_error = device_count_error
        self.driver_version = driver_version
        self.runtime_version = runtime_version
        self.violations: list[str] = []
        self.calls: list[str] = []
        self.fail_calls: dict[str, cudaError_t] = {}
        """Name of a cudart function -> the error it returns from now on (fault injection)."""
        self.sticky: cudaError_t | None = None
        """Set by ``fault``: every call returns it from then on."""
        self._lock = threading.RLock()
        self._thread_device: dict[int, int] = {}
        self._device: dict[int, _Allocation] = {}
        self._pinned: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self._streams: dict[int, _FakeStream] = {}
        self._addresses = itertools.count(0x7F00_0000_0000, 0x10_0000)
        self._stream_handles = itertools.count(0x5000, 0x10)
        self.module = self._make_module()

    # -- bookkeeping the tests read ---------------------------------------------

    def live(self) -> dict[str, int]:
        """How many device allocations, pinned allocations and streams are alive."""
        with self._lock:
            return {
                "device": len(self._device),
                "pinned": len(self._pinned),
                "streams": len(self._streams),
            }

    def violate(self, message: str) -> None:
        with self._lock:
            self.violations.append(message)

    def threads_with_device(self) -> set[int]:
        with self._lock:
            return set(self._thread_device)

    # -- what the fake TensorRT uses -------------------------------------------

    def fault(self, error: cudaError_t) -> None:
        """A kernel hit ``error``; a sticky one fails every later call in the process."""
        if error in STICKY_ERRORS:
            with self._lock:
                self.sticky = error

    def current_device(self) -> int:
        """The calling thread's device (0 until it calls cudaSetDevice, as in CUDA)."""
        with self._lock:
            return self._thread_device.get(threading.get_ident(), 0)

    def fits_device(self, address: int, nbytes: int) -> bool:
        with self._lock:
            return self._find(address, nbytes) is not None

    def require_device(self, what: str) -> bool:
        if threading.get_ident() not in self._thread_device:
            self.violate(f"{what} in a thread that never called cudaSetDevice")
            return False
        return True

    def _find(self, address: int, nbytes: int) -> tuple[_Allocation, int] | None:
        for allocation in self._device.values():
            offset = address - allocation.address
            if offset >= 0 and offset + nbytes <= len(allocation.data):
                return allocation, offset
        return None

    def read_device(self, address: int, nbytes: int, what: str) -> bytes | None:
        with self._lock:
            found = self._find(address, nbytes)
            if found is None:
                self.violate(
                    f"{what}: {nbytes} bytes at {address:#x} are not inside a live device allocation"
                )
                return None
            allocation, offset = found
            return bytes(allocation.data[offset : offset + nbytes])

    def write_device(self, address: int, data: bytes, what: str) -> bool:
        with self._lock:
            found = self._find(address, len(data))
            if found is None:
                self.violate(f"{what}: {len(data)} bytes at {address:#x} do not fit a live device allocation")
                return False
            allocation, offset = found
            allocation.data[offset : offset + len(data)] = data
            return True

    def enqueue(self, stream_handle: int, work: Callable[[], None], what: str) -> bool:
        with self._lock:
            if stream_handle == 0:
                self.violate(f"{what} on the legacy default stream")
                return False
            stream = self._streams.get(stream_handle)
            if stream is None:
                self.violate(f"{what} on stream {stream_handle:#x}, which is not alive")
                return False
            stream.queue.append(work)
            return True

    # -- the module -------------------------------------------------------------

    def _make_module(self) -> types.ModuleType:
        module = types.ModuleType("cuda.bindings.runtime")
        module.cudaError_t = cudaError_t  # type: ignore[attr-defined]
        module.cudaMemcpyKind = cudaMemcpyKind  # type: ignore[attr-defined]
        module.cudaStream_t = cudaStream_t  # type: ignore[attr-defined]
        module.cudaStreamNonBlocking = 1  # type: ignore[attr-defined]
        for name in (
            "cudaGetErrorName",
            "cudaGetErrorString",
            "cudaGetDeviceCount",
            "cudaSetDevice",
            "cudaGetDeviceProperties",
            "cudaDriverGetVersion",
            "cudaRuntimeGetVersion",
            "cudaMalloc",
            "cudaFree",
            "cudaMallocHost",
            "cudaFreeHost",
            "cudaStreamCreate",
            "cudaStreamCreateWithFlags",
            "cudaStreamSynchronize",
            "cudaStreamDestroy",
            "cudaMemcpyAsync",
        ):
            setattr(module, name, self._recorded(name, getattr(self, "_" + name)))
        return module

    def _recorded(
        self, name: str, function: Callable[..., tuple[Any, ...]]
    ) -> Callable[..., tuple[Any, ...]]:
        def call(*args: Any) -> tuple[Any, ...]:
            with self._lock:
                self.calls.append(name)
                injected = self.fail_calls.get(name)
                if self.sticky is not None and name not in ("cudaGetErrorName", "cudaGetErrorString"):
                    injected = self.sticky
            if injected is not None:
                return (injected, None) if name not in _NO_RESULT else (injected,)
            return function(*args)

        call.__name__ = name
        return call

    def _cudaGetErrorName(self, error: cudaError_t) -> tuple[Any, ...]:
        return cudaError_t.cudaSuccess, error.name.encode()

    def _cudaGetErrorString(self, error: cudaError_t) -> tuple[Any, ...]:
        return cudaError_t.cudaSuccess, _ERROR_TEXT.get(error, b"unknown error")

    def _cudaGetDeviceCount(self) -> tuple[Any, ...]:
        if self.device_count_error is not None:
            return self.device_count_error, None
        if not self.devices:
            return cudaError_t.cudaErrorNoDevice, None
        return cudaError_t.cudaSuccess, len(self.devices)

    def _cudaSetDevice(self, index: int) -> tuple[Any, ...]:
        if self.device_count_error is not None:
            return (self.device_count_error,)
        if not 0 <= index < len(self.devices):
            return (cudaError_t.cudaErrorInvalidDevice,)
        with self._lock:
            self._thread_device[threading.get_ident()] = index
        return (cudaError_t.cudaSuccess,)

    def _cudaGetDeviceProperties(self, index: int) -> tuple[Any, ...]:
        if self.device_count_error is not None:
            return self.device_count_error, None
        if not 0 <= index < len(self.devices):
            return cudaError_t.cudaErrorInvalidDevice, None
        return cudaError_t.cudaSuccess, self.devices[index]

    def _cudaDriverGetVersion(self) -> tuple[Any, ...]:
        return cudaError_t.cudaSuccess, self.driver_version

    def _cudaRuntimeGetVersion(self) -> tuple[Any, ...]:
        return cudaError_t.cudaSuccess, self.runtime_version

    def _cudaMalloc(self, nbytes: int) -> tuple[Any, ...]:
        if not self.require_device("cudaMalloc"):
            return cudaError_t.cudaErrorInvalidValue, None
        with self._lock:
            address = next(self._addresses)
            self._device[address] = _Allocation(address, bytearray(int(nbytes)))
        return cudaError_t.cudaSuccess, address

    def _cudaFree(self, address: int) -> tuple[Any, ...]:
        with self._lock:
            if self._device.pop(int(address), None) is None:
                self.violate(f"cudaFree({int(address):#x}) of memory that is not allocated")
                return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def _cudaMallocHost(self, nbytes: int) -> tuple[Any, ...]:
        if not self.require_device("cudaMallocHost"):
            return cudaError_t.cudaErrorInvalidValue, None
        buffer = ctypes.create_string_buffer(int(nbytes))
        address = ctypes.addressof(buffer)
        with self._lock:
            self._pinned[address] = buffer
        return cudaError_t.cudaSuccess, address

    def _cudaFreeHost(self, address: int) -> tuple[Any, ...]:
        with self._lock:
            if self._pinned.pop(int(address), None) is None:
                self.violate(f"cudaFreeHost({int(address):#x}) of memory that is not allocated")
                return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def _cudaStreamCreate(self) -> tuple[Any, ...]:
        return self._cudaStreamCreateWithFlags(0)

    def _cudaStreamCreateWithFlags(self, flags: int) -> tuple[Any, ...]:
        if not self.require_device("cudaStreamCreate"):
            return cudaError_t.cudaErrorInvalidValue, None
        with self._lock:
            handle = next(self._stream_handles)
            self._streams[handle] = _FakeStream(handle)
        return cudaError_t.cudaSuccess, cudaStream_t(handle)

    def _take_queue(self, stream: Any, what: str) -> list[Callable[[], None]] | None:
        handle = int(stream)
        with self._lock:
            found = self._streams.get(handle)
            if found is None:
                self.violate(f"{what} of stream {handle:#x}, which is not alive")
                return None
            work, found.queue = found.queue, []
            return work

    def _cudaStreamSynchronize(self, stream: Any) -> tuple[Any, ...]:
        if not self.require_device("cudaStreamSynchronize"):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        work = self._take_queue(stream, "cudaStreamSynchronize")
        if work is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for item in work:
            item()
        return (cudaError_t.cudaSuccess,)

    def _cudaStreamDestroy(self, stream: Any) -> tuple[Any, ...]:
        work = self._take_queue(stream, "cudaStreamDestroy")
        if work is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for item in work:  # CUDA finishes pending work before releasing the stream
            item()
        with self._lock:
            self._streams.pop(int(stream), None)
        return (cudaError_t.cudaSuccess,)

    def _cudaMemcpyAsync(
        self, dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: Any
    ) -> tuple[Any, ...]:
        what = f"cudaMemcpyAsync({kind.name})"
        if not self.require_device(what):
            return (cudaError_t.cudaErrorInvalidValue,)
        dst, src, nbytes = int(dst), int(src), int(nbytes)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            host, device = src, dst
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            host, device = dst, src
        else:
            self.violate(f"{what}: kiln only copies host<->device")
            return (cudaError_t.cudaErrorInvalidValue,)
        if not self._is_pinned(host, nbytes):
            self.violate(f"{what}: host side {host:#x} (+{nbytes}) is not pinned memory from cudaMallocHost")
            return (cudaError_t.cudaErrorInvalidValue,)
        with self._lock:
            if self._find(device, nbytes) is None:
                self.violate(f"{what}: device side {device:#x} (+{nbytes}) is not a live allocation")
                return (cudaError_t.cudaErrorInvalidValue,)

        def copy() -> None:
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.write_device(device, ctypes.string_at(host, nbytes), what)
            else:
                data = self.read_device(device, nbytes, what)
                if data is not None:
                    ctypes.memmove(host, data, nbytes)

        if not self.enqueue(int(stream), copy, what):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return (cudaError_t.cudaSuccess,)

    def _is_pinned(self, address: int, nbytes: int) -> bool:
        with self._lock:
            for start, buffer in self._pinned.items():
                if start <= address and address + nbytes <= start + len(buffer):
                    return True
        return False


_NO_RESULT = {
    "cudaSetDevice",
    "cudaFree",
    "cudaFreeHost",
    "cudaStreamSynchronize",
    "cudaStreamDestroy",
    "cudaMemcpyAsync",
}
