"""The NVML collector: Triton's GPU gauge names, read at scrape time, never breaking /metrics."""

from __future__ import annotations

import logging
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.gpu_metrics import GpuMetricsCollector, register_gpu_collector
from tests.fakes.install import install_fake_nvml
from tests.fakes.pynvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    FakeNvmlDevice,
)

GAUGES = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_power_usage")


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """(metric name, gpu_uuid) -> value, parsed from the exposition text."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, sample.labels["gpu_uuid"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(autouse=True)
def every_gpu_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def two_gpus() -> list[FakeNvmlDevice]:
    return [
        FakeNvmlDevice("GPU-aaaa", 42, 3 * 1024**3, 80 * 1024**3, 250_500),
        FakeNvmlDevice("GPU-bbbb", 7, 1024**3, 24 * 1024**3, 72_000),
    ]


def test_gauges_have_tritons_names_labels_and_units(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_nvml(monkeypatch, two_gpus())
    registry = CollectorRegistry()
    assert register_gpu_collector(registry) is True
    assert samples(registry) == {
        ("nv_gpu_utilization", "GPU-aaaa"): 0.42,
        ("nv_gpu_memory_used_bytes", "GPU-aaaa"): 3 * 1024**3,
        ("nv_gpu_memory_total_bytes", "GPU-aaaa"): 80 * 1024**3,
        ("nv_gpu_power_usage", "GPU-aaaa"): 250.5,
        ("nv_gpu_utilization", "GPU-bbbb"): 0.07,
        ("nv_gpu_memory_used_bytes", "GPU-bbbb"): 1024**3,
        ("nv_gpu_memory_total_bytes", "GPU-bbbb"): 24 * 1024**3,
        ("nv_gpu_power_usage", "GPU-bbbb"): 72.0,
    }
    text = generate_latest(registry).decode()
    for name in GAUGES:
        assert f"# TYPE {name} gauge" in text


def test_values_are_read_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = two_gpus()
    install_fake_nvml(monkeypatch, devices)
    registry = CollectorRegistry()
    register_gpu_collector(registry)
    devices[0].utilization_percent = 99
    assert samples(registry)[("nv_gpu_utilization", "GPU-aaaa")] == 0.99


def test_a_failing_device_leaves_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    devices = two_gpus()
    devices[0].failing["nvmlDeviceGetUUID"] = NVML_ERROR_GPU_IS_LOST
    install_fake_nvml(monkeypatch, devices)
    registry = CollectorRegistry()
    register_gpu_collector(registry)
    with caplog.at_level(logging.WARNING, logger="service.gpu_metrics"):
        found = samples(registry)
    assert {uuid for _, uuid in found} == {"GPU-bbbb"}
    assert len(found) == 4
    assert "GPU is lost" in caplog.text


def test_an_unsupported_reading_drops_only_that_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = two_gpus()
    devices[1].failing["nvmlDeviceGetPowerUsage"] = NVML_ERROR_NOT_SUPPORTED
    install_fake_nvml(monkeypatch, devices)
    registry = CollectorRegistry()
    register_gpu_collector(registry)
    found = samples(registry)
    assert ("nv_gpu_power_usage", "GPU-bbbb") not in found
    assert found[("nv_gpu_memory_used_bytes", "GPU-bbbb")] == 1024**3
    assert found[("nv_gpu_power_usage", "GPU-aaaa")] == 250.5


def test_without_pynvml_nothing_is_registered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    registry = CollectorRegistry()
    with caplog.at_level(logging.DEBUG, logger="service.gpu_metrics"):
        assert register_gpu_collector(registry) is False
    assert generate_latest(registry) == b""
    assert len(caplog.records) == 1
    assert "pynvml" in caplog.records[0].getMessage()


def test_without_a_driver_nothing_is_registered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_fake_nvml(monkeypatch, two_gpus(), init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    registry = CollectorRegistry()
    with caplog.at_level(logging.DEBUG, logger="service.gpu_metrics"):
        assert register_gpu_collector(registry) is False
    assert generate_latest(registry) == b""
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert "NVML did not start" in caplog.text


def test_without_a_device_nothing_is_registered_and_nvml_is_shut_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = install_fake_nvml(monkeypatch, [])
    registry = CollectorRegistry()
    assert register_gpu_collector(registry) is False
    assert generate_latest(registry) == b""
    assert nvml.initialized == 0
    assert nvml.shutdowns == 1


def test_on_this_machine_it_registers_only_with_a_gpu() -> None:
    """Real pynvml here: without a driver nvmlInit fails and nothing is registered."""
    registry = CollectorRegistry()
    registered = register_gpu_collector(registry)
    text = generate_latest(registry).decode()
    assert ("nv_gpu_memory_total_bytes" in text) == registered


def test_a_closed_collector_reports_no_samples_and_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install_fake_nvml(monkeypatch, two_gpus())
    nvml.module.nvmlInit()
    collector = GpuMetricsCollector(nvml.module)
    registry = CollectorRegistry()
    registry.register(collector)
    assert samples(registry)
    collector.close()
    collector.close()
    assert samples(registry) == {}
    assert nvml.shutdowns == 1


# -- scope and MIG (audit finding 9) ----------------------------------------------------------


def test_finding_9b_only_the_gpus_this_process_uses_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_nvml(monkeypatch, two_gpus())
    registry = CollectorRegistry()
    assert register_gpu_collector(registry)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert {uuid for _, uuid in samples(registry)} == {"GPU-bbbb"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa")  # a UUID prefix, as CUDA accepts
    assert {uuid for _, uuid in samples(registry)} == {"GPU-aaaa"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert samples(registry) == {}


def test_finding_9a_mig_instances_are_reported_by_their_own_handles(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    instances = [
        FakeNvmlDevice("MIG-1111", memory_used_bytes=1024**3, memory_total_bytes=10 * 1024**3, is_mig=True),
        FakeNvmlDevice(
            "MIG-2222", memory_used_bytes=2 * 1024**3, memory_total_bytes=20 * 1024**3, is_mig=True
        ),
    ]
    parent = FakeNvmlDevice("GPU-mig0", 55, 7 * 1024**3, 80 * 1024**3, 300_000, mig_devices=instances)
    install_fake_nvml(monkeypatch, [parent, two_gpus()[1]])
    registry = CollectorRegistry()
    assert register_gpu_collector(registry)
    with caplog.at_level(logging.DEBUG, logger="service.gpu_metrics"):
        got = samples(registry)
    assert got[("nv_gpu_memory_used_bytes", "MIG-1111")] == 1024**3
    assert got[("nv_gpu_memory_total_bytes", "MIG-2222")] == 20 * 1024**3
    assert {uuid for _, uuid in got} == {"MIG-1111", "MIG-2222", "GPU-bbbb"}, "no whole-GPU values"
    assert not any(
        name in ("nv_gpu_utilization", "nv_gpu_power_usage") for name, uuid in got if "MIG" in uuid
    )
    assert all(record.levelno < logging.WARNING for record in caplog.records), "omissions are debug lines"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2222")
    assert {uuid for _, uuid in samples(registry)} == {"MIG-2222"}
