"""GPU gauges for /metrics, read through NVML (nvidia-ml-py) at scrape time.

The names are Triton's, so existing dashboards work: ``nv_gpu_utilization``
(0-1), ``nv_gpu_memory_used_bytes``, ``nv_gpu_memory_total_bytes`` and
``nv_gpu_power_usage`` (watts), each labelled ``gpu_uuid``.

``register_gpu_collector`` adds the collector only where NVML starts and sees a
device; elsewhere it registers nothing and logs one debug line. A scrape never
fails because of NVML: a device, or a single reading, that errors is left out
and logged, and the other devices are still reported.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
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


def _new_families() -> dict[str, GaugeMetricFamily]:
    return {name: GaugeMetricFamily(name, doc, labels=_LABELS) for name, doc in _GAUGES.items()}


class GpuMetricsCollector(Collector):
    """A prometheus_client collector reading every NVML device at each scrape.

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
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            _log.warning("NVML could not count GPUs during a scrape: %s", exc)
            count = 0
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
            except nvml.NVMLError as exc:
                _log.warning("NVML could not read GPU %d, leaving it out of this scrape: %s", index, exc)
                continue
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            for name, reading in readings:
                # One failing reading (e.g. power on a GPU without a sensor) skips just that sample.
                try:
                    value = float(reading(handle))
                except nvml.NVMLError as exc:
                    _log.debug("NVML: %s of GPU %s is unavailable: %s", name, uuid, exc)
                    continue
                families[name].add_metric([uuid], value)
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
