"""GPU gauges for /metrics, read through NVML (nvidia-ml-py) at scrape time.

The names are Triton's, so existing dashboards work: ``nv_gpu_utilization``
(0-1), ``nv_gpu_memory_used_bytes``, ``nv_gpu_memory_total_bytes`` and
``nv_gpu_power_usage`` (watts), each labelled ``gpu_uuid``.

``register_gpu_collector`` adds the collector only where NVML starts and sees a
device; elsewhere it registers nothing and logs one debug line. A scrape never
fails because of NVML: a device, or a single reading, that errors is left out
and logged, and the other devices are still reported.

Scope: NVML lists every GPU of the host and ignores ``CUDA_VISIBLE_DEVICES``, so
when that is set only the GPUs (indices or UUIDs) and MIG instances it names are
reported: the ones this process uses. A GPU in MIG mode is reported as its MIG
instances, each by its own handle and ``MIG-...`` UUID, with memory gauges only:
NVML does not support utilization on MIG, power is the whole GPU's, and the
parent's memory needs privileges. Readings NVML does not give are left out (with
a debug line), never filled with another device's value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

_log = logging.getLogger(__name__)

_GAUGES = {
    "nv_gpu_utilization": "GPU utilization rate (0.0 - 1.0)",
    "nv_gpu_memory_used_bytes": "GPU used memory (bytes)",
    "nv_gpu_memory_total_bytes": "GPU total memory (bytes)",
    "nv_gpu_power_usage": "GPU power usage (watts)",
}
_LABELS = ["gpu_uuid"]


_MIG_READINGS = ("nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes")


@dataclass(frozen=True)
class _Unit:
    """A GPU, or a MIG instance of one, to report under its own UUID."""

    handle: Any
    uuid: str
    index: int
    """The NVML index of the GPU (of the parent, for a MIG instance)."""
    is_mig: bool


def _new_families() -> dict[str, GaugeMetricFamily]:
    return {name: GaugeMetricFamily(name, doc, labels=_LABELS) for name, doc in _GAUGES.items()}


class GpuMetricsCollector(Collector):
    """A prometheus_client collector reading the GPUs in scope (see above) at each scrape.

    Takes an initialized ``pynvml`` module; ``close`` shuts NVML down. ``collect``
    runs on the scraping thread and may run concurrently; NVML is thread-safe.
    """

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._closed = False
        self._close_lock = threading.Lock()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families without samples, so registering never calls NVML."""
        yield from _new_families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = _new_families()
        if self._closed:
            yield from families.values()
            return
        nvml = self._nvml
        readings: tuple[tuple[str, Callable[[Any], float]], ...] = (
            (
                "nv_gpu_utilization",
                lambda handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
            ),
            ("nv_gpu_memory_used_bytes", lambda handle: nvml.nvmlDeviceGetMemoryInfo(handle).used),
            (
                "nv_gpu_memory_total_bytes",
                lambda handle: nvml.nvmlDeviceGetMemoryInfo(handle).total,
            ),
            # NVML reports milliwatts.
            ("nv_gpu_power_usage", lambda handle: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        )
        for unit in _units_in_scope(nvml, os.environ.get("CUDA_VISIBLE_DEVICES")):
            for name, reading in readings:
                if unit.is_mig and name not in _MIG_READINGS:
                    continue  # not supported per MIG instance (see the module docstring)
                # One failing reading (e.g. power on a GPU without a sensor) skips just that sample.
                try:
                    value = float(reading(unit.handle))
                except nvml.NVMLError as exc:
                    _log.debug("NVML: %s of GPU %s is unavailable: %s", name, unit.uuid, exc)
                    continue
                families[name].add_metric([unit.uuid], value)
        yield from families.values()

    def close(self) -> None:
        """Stop reading and shut NVML down. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            _log.debug("NVML shutdown failed: %s", exc)


def _uuid(nvml: Any, handle: Any) -> str:
    uuid = nvml.nvmlDeviceGetUUID(handle)
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def _mig_instances(nvml: Any, handle: Any, index: int) -> list[_Unit] | None:
    """The MIG instances of a GPU in MIG mode, or None when MIG is off (or unsupported)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:
        return None  # GPUs without MIG answer NOT_SUPPORTED
    if current != nvml.NVML_DEVICE_MIG_ENABLE:
        return None
    instances = []
    for slot in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            instances.append(_Unit(mig, _uuid(nvml, mig), index, is_mig=True))
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) != nvml.NVML_ERROR_NOT_FOUND:  # NOT_FOUND: an empty slot
                _log.debug("NVML: MIG slot %d of GPU %d is unavailable: %s", slot, index, exc)
    return instances


def _units_in_scope(nvml: Any, visible: str | None) -> list[_Unit]:
    """What to report: every GPU NVML sees, or those ``visible`` (CUDA_VISIBLE_DEVICES) names;
    a GPU in MIG mode as its instances."""
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        _log.warning("NVML could not count GPUs during a scrape: %s", exc)
        return []
    gpus: list[tuple[_Unit, list[_Unit] | None]] = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu = _Unit(handle, _uuid(nvml, handle), index, is_mig=False)
        except nvml.NVMLError as exc:
            _log.warning("NVML could not read GPU %d, leaving it out of this scrape: %s", index, exc)
            continue
        gpus.append((gpu, _mig_instances(nvml, handle, index)))
    if visible is None:
        return [unit for gpu, instances in gpus for unit in (instances if instances is not None else [gpu])]
    chosen: list[_Unit] = []
    for entry in (part.strip() for part in visible.split(",")):
        if not entry:
            continue
        for gpu, instances in gpus:
            # An index names a GPU (NVML's order is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID);
            # a UUID (or its prefix, as CUDA accepts) names a GPU or one MIG instance.
            if entry == str(gpu.index) or gpu.uuid.startswith(entry):
                chosen.extend(instances if instances is not None else [gpu])
            chosen.extend(mig for mig in instances or [] if mig.uuid.startswith(entry))
    by_uuid: dict[str, _Unit] = {}
    for unit in chosen:
        by_uuid.setdefault(unit.uuid, unit)
    return list(by_uuid.values())


def register_gpu_collector(registry: CollectorRegistry) -> bool:
    """Register GPU gauges on ``registry`` when NVML starts and sees at least one GPU.

    Returns True when registered (NVML then stays initialized for the process's
    life), False when not: no pynvml, no driver, or no device. Never raises for
    those; logs one debug line saying why.
    """
    try:
        import pynvml
    except ImportError as exc:
        _log.debug("GPU metrics off: pynvml (nvidia-ml-py) does not import (%s)", exc)
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        _log.debug("GPU metrics off: NVML did not start (%s)", exc)
        return False
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        reason = "NVML sees no GPU"
    except pynvml.NVMLError as exc:
        count, reason = 0, f"NVML could not count GPUs ({exc})"
    if count < 1:
        _log.debug("GPU metrics off: %s", reason)
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
        return False
    registry.register(GpuMetricsCollector(pynvml))
    _log.debug("GPU metrics on: NVML sees %d GPU(s)", count)
    return True
