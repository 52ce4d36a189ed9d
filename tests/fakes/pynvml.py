"""A fake ``pynvml`` (nvidia-ml-py) with the calls kiln's GPU collector makes.

Devices are configured per test; any NVML call of a device can be made to fail
(``FakeNvmlDevice.failing``), as a real GPU does for unsupported queries or
after it falls off the bus. ``nvmlInit`` can fail like a machine without a driver.

MIG, as NVML documents it (nvml.h / docs.nvidia.com/deploy/nvml-api): a GPU with
``mig_devices`` set is in MIG mode (``nvmlDeviceGetMigMode`` -> [1, 1]); its MIG
instances are reached with ``nvmlDeviceGetMigDeviceHandleByIndex`` (NOT_FOUND for
an empty slot up to ``nvmlDeviceGetMaxMigDeviceCount``). On the parent, memory
info needs privileges ("only if the caller has appropriate privileges": NO_PERMISSION
here) and utilization is NOT_SUPPORTED; on a MIG handle, utilization and power are
NOT_SUPPORTED, memory is the instance's own. NVML does not read
``CUDA_VISIBLE_DEVICES``: it always lists every GPU of the host (or container).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_DEVICE_MIG_ENABLE = 1
MAX_MIG_DEVICES = 7
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIBRARY_NOT_FOUND = 12


class NVMLError(Exception):
    """Like pynvml's: ``value`` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {
            NVML_ERROR_UNINITIALIZED: "Uninitialized",
            NVML_ERROR_NOT_SUPPORTED: "Not Supported",
            NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
            NVML_ERROR_NOT_FOUND: "Not Found",
            NVML_ERROR_GPU_IS_LOST: "GPU is lost",
            NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        }.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeNvmlDevice:
    uuid: str
    utilization_percent: int = 0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 80 * 1024**3
    power_milliwatts: int = 0
    failing: dict[str, int] = field(default_factory=dict)
    """NVML function name -> the error code it raises for this device."""
    mig_devices: list[FakeNvmlDevice] | None = None
    """Set: the GPU is in MIG mode with these instances. None: MIG off."""
    is_mig: bool = False


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Memory:
    total: int
    free: int
    used: int


class FakeNvml:
    """State behind one fake ``pynvml`` module (``self.module``)."""

    def __init__(self, devices: list[FakeNvmlDevice], *, init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.initialized = 0
        self.shutdowns = 0
        self.module = self._make_module()

    def _device(self, handle: Any, function: str) -> FakeNvmlDevice:
        if self.initialized <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        device: FakeNvmlDevice = handle
        if function in device.failing:
            raise NVMLError(device.failing[function])
        if device.is_mig and function in ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage"):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if device.mig_devices is not None:
            if function == "nvmlDeviceGetUtilizationRates":
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            if function == "nvmlDeviceGetMemoryInfo":
                raise NVMLError(NVML_ERROR_NO_PERMISSION)
        return device

    def _make_module(self) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        module.NVMLError = NVMLError  # type: ignore[attr-defined]
        module.NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED  # type: ignore[attr-defined]
        module.NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND  # type: ignore[attr-defined]
        module.NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE  # type: ignore[attr-defined]

        def nvmlInit() -> None:
            if self.init_error is not None:
                raise NVMLError(self.init_error)
            self.initialized += 1

        def nvmlShutdown() -> None:
            if self.initialized <= 0:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            self.initialized -= 1
            self.shutdowns += 1

        def nvmlDeviceGetCount() -> int:
            if self.initialized <= 0:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            return len(self.devices)

        def nvmlDeviceGetHandleByIndex(index: int) -> FakeNvmlDevice:
            return self._device(self.devices[index], "nvmlDeviceGetHandleByIndex")

        def nvmlDeviceGetUUID(handle: Any) -> str:
            return self._device(handle, "nvmlDeviceGetUUID").uuid

        def nvmlDeviceGetUtilizationRates(handle: Any) -> _Utilization:
            device = self._device(handle, "nvmlDeviceGetUtilizationRates")
            return _Utilization(gpu=device.utilization_percent, memory=0)

        def nvmlDeviceGetMemoryInfo(handle: Any) -> _Memory:
            device = self._device(handle, "nvmlDeviceGetMemoryInfo")
            free = device.memory_total_bytes - device.memory_used_bytes
            return _Memory(total=device.memory_total_bytes, free=free, used=device.memory_used_bytes)

        def nvmlDeviceGetPowerUsage(handle: Any) -> int:
            return self._device(handle, "nvmlDeviceGetPowerUsage").power_milliwatts

        def nvmlDeviceGetMigMode(handle: Any) -> list[int]:
            device = self._device(handle, "nvmlDeviceGetMigMode")
            if device.is_mig:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            mode = NVML_DEVICE_MIG_ENABLE if device.mig_devices is not None else 0
            return [mode, mode]

        def nvmlDeviceGetMaxMigDeviceCount(handle: Any) -> int:
            device = self._device(handle, "nvmlDeviceGetMaxMigDeviceCount")
            return MAX_MIG_DEVICES if device.mig_devices is not None else 0

        def nvmlDeviceGetMigDeviceHandleByIndex(handle: Any, index: int) -> FakeNvmlDevice:
            device = self._device(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
            instances = device.mig_devices or []
            if device.mig_devices is None or index >= MAX_MIG_DEVICES:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            if index >= len(instances):
                raise NVMLError(NVML_ERROR_NOT_FOUND)
            return instances[index]

        for function in (
            nvmlInit,
            nvmlShutdown,
            nvmlDeviceGetCount,
            nvmlDeviceGetHandleByIndex,
            nvmlDeviceGetUUID,
            nvmlDeviceGetUtilizationRates,
            nvmlDeviceGetMemoryInfo,
            nvmlDeviceGetPowerUsage,
            nvmlDeviceGetMigMode,
            nvmlDeviceGetMaxMigDeviceCount,
            nvmlDeviceGetMigDeviceHandleByIndex,
        ):
            setattr(module, function.__name__, function)
        return module
