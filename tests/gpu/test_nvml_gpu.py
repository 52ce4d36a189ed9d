"""The NVML collector against a real driver."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.gpu_metrics import register_gpu_collector

pytestmark = pytest.mark.gpu


def test_every_gpu_reports_memory_and_utilization(nvml: Any) -> None:
    registry = CollectorRegistry()
    assert register_gpu_collector(registry) is True
    families = {
        family.name: family for family in text_string_to_metric_families(generate_latest(registry).decode())
    }
    count = nvml.nvmlDeviceGetCount()
    totals = families["nv_gpu_memory_total_bytes"].samples
    assert len(totals) == count
    assert all(sample.value > 0 and sample.labels["gpu_uuid"] for sample in totals)
    assert all(0.0 <= sample.value <= 1.0 for sample in families["nv_gpu_utilization"].samples)
    used = {
        sample.labels["gpu_uuid"]: sample.value for sample in families["nv_gpu_memory_used_bytes"].samples
    }
    for sample in totals:
        assert 0 <= used[sample.labels["gpu_uuid"]] <= sample.value
