"""CUDA runtime helpers over cuda-python (``cuda.bindings.runtime``).

Every cuda-python call returns ``(cudaError_t, *results)``; ``check`` turns a
non-zero error into ``CudaError`` and returns the results, so no call's error is
ever dropped. The module imports cuda-python lazily (through ``sys.modules``, so
tests can install a fake) and works with the cuda-python 12.6+ and 13.x layout.

Threads: CUDA binds the current device per thread. Call ``set_device`` in every
thread before it touches memory or streams; the objects here do not do it for you.
Ownership: ``DeviceBuffer``, ``PinnedBuffer`` and ``Stream`` own their CUDA
resource until ``free()``/``destroy()``; there is no finalizer, because freeing
during interpreter shutdown can crash inside the driver. Owners free explicitly.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from engines.errors import BackendUnavailable, DeviceLost, EngineError

_RUNTIME_MODULE = "cuda.bindings.runtime"

STICKY_ERRORS = frozenset(
    {
        "cudaErrorIllegalAddress",
        "cudaErrorLaunchFailure",
        "cudaErrorHardwareStackError",
        "cudaErrorIllegalInstruction",
        "cudaErrorMisalignedAddress",
        "cudaErrorInvalidAddressSpace",
        "cudaErrorInvalidPc",
        "cudaErrorLaunchTimeout",
        "cudaErrorECCUncorrectable",
    }
)
"""Errors after which "any further CUDA work will return the same error. To continue
using CUDA, the process must be terminated and relaunched" (CUDA Runtime API,
``cudaError``); an uncorrectable ECC error leaves the context the same way."""


class CudaError(EngineError):
    """A CUDA runtime call failed; ``details['error']`` is the error's name."""

    kind = "cuda_error"


class CudaDeviceLost(CudaError, DeviceLost):
    """A sticky CUDA error: the device is unusable until the process restarts."""

    kind = DeviceLost.kind


def runtime() -> ModuleType:
    """The ``cuda.bindings.runtime`` module. Raises ``BackendUnavailable`` without cuda-python."""
    try:
        return importlib.import_module(_RUNTIME_MODULE)
    except ImportError as exc:
        raise BackendUnavailable(
            f"cuda-python is not installed or too old ({exc}); install kiln with the 'gpu' extra"
        ) from exc


def error_name(error: Any) -> str:
    """The CUDA name of an error code, e.g. ``cudaErrorMemoryAllocation``."""
    cudart = runtime()
    status, name = cudart.cudaGetErrorName(error)
    if int(status.value) != 0 or name is None:
        return f"cudaError {int(error.value)}"
    return name.decode() if isinstance(name, bytes) else str(name)


def error_text(error: Any) -> str:
    """CUDA's one-line description of an error code."""
    cudart = runtime()
    status, text = cudart.cudaGetErrorString(error)
    if int(status.value) != 0 or text is None:
        return ""
    return text.decode() if isinstance(text, bytes) else str(text)


def check(result: tuple[Any, ...], operation: str = "CUDA call") -> Any:
    """Unpack a cuda-python result tuple, raising ``CudaError`` when its error is non-zero.

    Returns None for a call without results, the result for one, a tuple for several.
    """
    error, *values = result
    if int(error.value) != 0:
        name = error_name(error)
        text = error_text(error)
        message = f"{operation} failed: {name}" + (f" ({text})" if text else "")
        error_class = CudaDeviceLost if name in STICKY_ERRORS else CudaError
        raise error_class(message, details={"error": name, "operation": operation})
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return tuple(values)


def device_count() -> int:
    """How many CUDA devices this process sees. Raises ``CudaError`` without a driver or device."""
    return int(check(runtime().cudaGetDeviceCount(), "cudaGetDeviceCount"))


def set_device(index: int) -> None:
    """Make ``index`` the current device of the calling thread."""
    check(runtime().cudaSetDevice(index), f"cudaSetDevice({index})")


@dataclass(frozen=True)
class DeviceProperties:
    """The facts about one GPU that an engine depends on."""

    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int
    multiprocessor_count: int


def device_properties(index: int) -> DeviceProperties:
    """Name, compute capability, memory and SM count of device ``index``."""
    props = check(runtime().cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    raw_name = props.name
    if isinstance(raw_name, bytes | bytearray):
        name = bytes(raw_name).split(b"\0", 1)[0].decode(errors="replace")
    else:
        name = str(raw_name).split("\0", 1)[0]
    return DeviceProperties(
        name=name.strip(),
        compute_capability=(int(props.major), int(props.minor)),
        total_memory_bytes=int(props.totalGlobalMem),
        multiprocessor_count=int(props.multiProcessorCount),
    )


def _format_cuda_version(encoded: int) -> str:
    # CUDA encodes versions as 1000 * major + 10 * minor (12040 -> "12.4").
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def driver_version() -> str:
    """The CUDA version the installed driver supports, e.g. ``"13.0"`` (``"0.0"`` without one)."""
    return _format_cuda_version(int(check(runtime().cudaDriverGetVersion(), "cudaDriverGetVersion")))


def runtime_version() -> str:
    """The CUDA runtime version cuda-python was built against, e.g. ``"13.0"``.

    Not what TensorRT runs on (it brings its own), so it is no part of an engine's key;
    it says which driver cuda-python needs.
    """
    return _format_cuda_version(int(check(runtime().cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")))


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc) on the current device; ``ptr`` is its address."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        self.nbytes = nbytes
        # cudaMalloc(0) may hand back a null pointer; TensorRT wants a real address.
        self.ptr: int = int(check(runtime().cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
        self._freed = False

    def free(self) -> None:
        """Return the memory to CUDA. Safe to call twice."""
        if self._freed:
            return
        self._freed = True
        check(runtime().cudaFree(self.ptr), "cudaFree")

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.free()


class PinnedBuffer:
    """``nbytes`` of page-locked host memory (cudaMallocHost), which async copies need.

    ``view(dtype, shape)`` is a numpy array over the first bytes; views are valid
    only until ``free()``, so copy what must outlive the buffer.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        self.nbytes = nbytes
        capacity = max(nbytes, 1)
        self.ptr: int = int(check(runtime().cudaMallocHost(capacity), f"cudaMallocHost({nbytes})"))
        self._bytes: np.ndarray | None = np.frombuffer(
            memoryview((ctypes.c_ubyte * capacity).from_address(self.ptr)), dtype=np.uint8
        )

    @property
    def bytes_view(self) -> np.ndarray:
        """The whole buffer as a writable uint8 array."""
        if self._bytes is None:
            raise CudaError("pinned buffer used after it was freed")
        return self._bytes

    def view(self, dtype: np.dtype[Any] | type, shape: tuple[int, ...]) -> np.ndarray:
        """A typed array of ``shape`` over the start of the buffer (no copy)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.nbytes:
            raise ValueError(
                f"a {dtype} array of shape {list(shape)} needs {nbytes} bytes; the buffer has {self.nbytes}"
            )
        return self.bytes_view[:nbytes].view(dtype).reshape(shape)

    def free(self) -> None:
        """Return the memory to CUDA. Safe to call twice."""
        if self._bytes is None:
            return
        self._bytes = None
        check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")

    def __enter__(self) -> PinnedBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.free()


class Stream:
    """A CUDA stream that does not synchronise with the legacy default stream.

    ``handle`` is its address as an int, what TensorRT's ``execute_async_v3`` takes.
    """

    def __init__(self) -> None:
        cudart = runtime()
        self._stream: Any = check(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )
        self.handle: int = int(self._stream)
        self._destroyed = False

    @property
    def cuda_stream(self) -> Any:
        """The ``cudaStream_t`` object for cuda-python calls."""
        if self._destroyed:
            raise CudaError("stream used after it was destroyed")
        return self._stream

    def synchronize(self) -> None:
        """Block the calling thread until all work queued on this stream has finished."""
        check(runtime().cudaStreamSynchronize(self.cuda_stream), "cudaStreamSynchronize")

    def destroy(self) -> None:
        """Release the stream. Safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        check(runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


def memcpy_htod_async(device_ptr: int, host_ptr: int, nbytes: int, stream: Stream) -> None:
    """Queue a copy of ``nbytes`` from pinned host memory to device memory on ``stream``."""
    cudart = runtime()
    check(
        cudart.cudaMemcpyAsync(
            device_ptr,
            host_ptr,
            nbytes,
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            stream.cuda_stream,
        ),
        "cudaMemcpyAsync(host to device)",
    )


def memcpy_dtoh_async(host_ptr: int, device_ptr: int, nbytes: int, stream: Stream) -> None:
    """Queue a copy of ``nbytes`` from device memory to pinned host memory on ``stream``."""
    cudart = runtime()
    check(
        cudart.cudaMemcpyAsync(
            host_ptr,
            device_ptr,
            nbytes,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            stream.cuda_stream,
        ),
        "cudaMemcpyAsync(device to host)",
    )
