"""After N known requests, every series moved by exactly what it should."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.metrics import KilnMetrics
from service.settings import Settings
from tests.conftest import upload, wait_for_state

Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(client: TestClient) -> dict[Sample, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values: dict[Sample, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def value(values: dict[Sample, float], name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[TestClient]:
    settings = Settings(store=tmp_path_factory.mktemp("metrics-store"), backend="onnxruntime")
    with TestClient(create_app(settings)) as test_client:
        upload(test_client, model_files["mlp"], "m")
        assert wait_for_state(test_client, "m")["state"] == "ready"
        yield test_client


def test_request_counters_and_histograms_move_by_exactly_the_requests(client: TestClient) -> None:
    before = scrape(client)
    rows_per_request = 2
    for _ in range(5):
        ok = client.post("/predict", json={"engine": "m", "inputs": [[0.5] * 16] * rows_per_request})
        assert ok.status_code == 200
    for _ in range(2):
        bad = client.post("/predict", json={"engine": "m", "inputs": [[0.5] * 3]})
        assert bad.status_code == 400
    v2_body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
    for _ in range(3):
        assert client.post("/v2/models/m/infer", json=v2_body).status_code == 200
    # An unknown engine is refused without creating a label set for it.
    assert client.post("/predict", json={"engine": "nope", "inputs": [[1.0]]}).status_code == 404
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    engine = {"engine": "m", "version": "1"}
    assert delta("kiln_requests_total", **engine, protocol="native", code="200") == 5
    assert delta("kiln_requests_total", **engine, protocol="native", code="400") == 2
    assert delta("kiln_requests_total", **engine, protocol="v2", code="200") == 3
    assert not any(dict(labels).get("engine") == "nope" for (_, labels) in after)
    assert delta("kiln_request_duration_seconds_count", **engine, protocol="native") == 7
    assert delta("kiln_request_duration_seconds_count", **engine, protocol="v2") == 3
    executed = 5 + 3  # sequential requests: one batch each
    assert delta("kiln_inferences_total", **engine) == 5 * rows_per_request + 3
    assert delta("kiln_batches_total", **engine) == executed
    assert delta("kiln_batch_size_count", **engine) == executed
    assert delta("kiln_batch_size_sum", **engine) == 5 * rows_per_request + 3
    assert delta("kiln_batch_size_bucket", **engine, le="1.0") == 3
    assert delta("kiln_batch_size_bucket", **engine, le="2.0") == executed
    assert delta("kiln_compute_duration_seconds_count", **engine) == executed
    assert delta("kiln_queue_duration_seconds_count", **engine) == executed
    assert value(after, "kiln_queue_depth", **engine) == 0
    assert delta("kiln_request_duration_seconds_sum", **engine, protocol="native") > 0


def test_build_counters_and_engine_states(client: TestClient, model_files: dict[str, Path]) -> None:
    before = scrape(client)
    upload(client, model_files["mlp"], "m2")  # same bytes and options: the cached engine
    assert wait_for_state(client, "m2")["state"] == "ready"
    upload(client, model_files["cnn"], "m3")  # a new build
    assert wait_for_state(client, "m3")["state"] == "ready"
    after = scrape(client)
    assert (
        value(after, "kiln_engine_builds_total", result="cached")
        - value(before, "kiln_engine_builds_total", result="cached")
        == 1
    )
    assert (
        value(after, "kiln_engine_builds_total", result="succeeded")
        - value(before, "kiln_engine_builds_total", result="succeeded")
        == 1
    )
    assert (
        value(after, "kiln_engine_build_duration_seconds_count")
        - value(before, "kiln_engine_build_duration_seconds_count")
        == 1
    )
    ready = sum(1 for e in client.get("/engines").json()["engines"] if e["state"] == "ready")
    assert value(after, "kiln_engines", state="ready") == ready
    assert value(after, "kiln_engines", state="building") == 0


def test_gpu_gauges_are_absent_without_a_gpu(client: TestClient) -> None:
    assert not any(name.startswith("nv_gpu_") for (name, _) in scrape(client))


def test_metric_names_follow_prometheus_conventions() -> None:
    metrics = KilnMetrics()
    names = {family.name for family in metrics.registry.collect()}
    assert {
        "kiln_requests",
        "kiln_request_duration_seconds",
        "kiln_queue_duration_seconds",
        "kiln_compute_duration_seconds",
        "kiln_batch_size",
        "kiln_queue_depth",
        "kiln_inferences",
        "kiln_engine_builds",
        "kiln_engine_build_duration_seconds",
        "kiln_engines",
    } <= names
    for family in metrics.registry.collect():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)


def test_serving_gauge_follows_the_swap_and_goes_with_the_version() -> None:
    metrics = KilnMetrics()

    def series() -> dict[tuple[str, ...], float]:
        return {
            tuple(
                sample.labels[k] for k in ("engine", "version", "tier", "backend", "precision")
            ): sample.value
            for family in metrics.registry.collect()
            if family.name == "kiln_engine_serving"
            for sample in family.samples
        }

    metrics.set_serving("m", 1, "baseline", "onnxruntime", "fp32")
    metrics.set_serving("n", 1, "optimized", "onnxruntime", "fp32")
    assert series() == {
        ("m", "1", "baseline", "onnxruntime", "fp32"): 1.0,
        ("n", "1", "optimized", "onnxruntime", "fp32"): 1.0,
    }
    metrics.set_serving("m", 1, "optimized", "onnxruntime", "int8")
    assert series() == {
        ("m", "1", "optimized", "onnxruntime", "int8"): 1.0,
        ("n", "1", "optimized", "onnxruntime", "fp32"): 1.0,
    }
    metrics.forget_engine("m", 1)
    assert series() == {("n", "1", "optimized", "onnxruntime", "fp32"): 1.0}
