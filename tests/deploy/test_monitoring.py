"""Alert rules, the Grafana dashboard, the scrape configs and the compose stack."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import CHART, ROOT

pytestmark = pytest.mark.deploy

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "kiln-alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kiln.json"

# The metrics kiln exports (the server's contract with this directory).
KILN_METRICS = {
    "kiln_requests_total",
    "kiln_request_duration_seconds",
    "kiln_queue_duration_seconds",
    "kiln_compute_duration_seconds",
    "kiln_batch_size",
    "kiln_queue_depth",
    "kiln_inferences_total",
    "kiln_engine_builds_total",
    "kiln_engine_build_duration_seconds",
    "kiln_engines",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_power_usage",
}
METRIC = re.compile(r"kiln_[a-z_]+|nv_gpu_[a-z_]+")
SUFFIX = re.compile(r"_(bucket|sum|count)$")


def metric_names(expressions: list[str]) -> set[str]:
    return {SUFFIX.sub("", m) for expr in expressions for m in METRIC.findall(expr)}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_server_exports_the_metrics_deploy_relies_on() -> None:
    from prometheus_client import CollectorRegistry

    from service.metrics import KilnMetrics

    registry = CollectorRegistry()
    KilnMetrics(registry)
    exported = {
        f"{family.name}_total" if family.type == "counter" else family.name for family in registry.collect()
    }
    kiln_names = {name for name in KILN_METRICS if name.startswith("kiln_")}
    assert kiln_names <= exported, f"not exported by service.metrics: {sorted(kiln_names - exported)}"

    sources = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    for name in KILN_METRICS - kiln_names:
        assert f'"{name}"' in sources, f"{name} is not exported by the server"


def test_canonical_copies_are_identical() -> None:
    pairs = [
        (CHART / "dashboards" / "kiln.json", DASHBOARD),
        (CHART / "files" / "kiln-alerts.yaml", RULES),
        (
            CHART / "files" / "prometheus-adapter-rules.yaml",
            DEPLOY / "prometheus-adapter" / "values.yaml",
        ),
    ]
    for canonical, copy in pairs:
        assert copy.read_bytes() == canonical.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from {canonical.relative_to(ROOT)}: "
            f"the chart's file is canonical, copy it over"
        )


def test_alert_rules_use_only_metrics_kiln_exports() -> None:
    used = metric_names([rule["expr"] for rule in alert_rules()])
    assert used, "no kiln metric found in the alert rules"
    assert used <= KILN_METRICS, f"unknown metrics in alert rules: {sorted(used - KILN_METRICS)}"


def test_dashboard_uses_only_metrics_kiln_exports() -> None:
    used = metric_names(dashboard_expressions())
    assert used <= KILN_METRICS, f"unknown metrics in the dashboard: {sorted(used - KILN_METRICS)}"
    # Every exported metric is on the dashboard.
    assert used == KILN_METRICS, f"metrics missing from the dashboard: {sorted(KILN_METRICS - used)}"


def test_alerts_cover_latency_queue_rejections_and_builds() -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    latency = by_name["KilnHighP99Latency"]["expr"]
    assert "histogram_quantile(0.99" in latency
    assert "kiln_request_duration_seconds_bucket" in latency
    assert "kiln_queue_duration_seconds" in by_name["KilnQueueSaturated"]["expr"]
    rejected = by_name["KilnRequestsRejected"]["expr"]
    assert 'code=~"503|504"' in rejected
    assert 'result="failed"' in by_name["KilnEngineBuildFailed"]["expr"]
    for rule in by_name.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys()


def test_every_alert_has_a_runbook_section_in_operations() -> None:
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9]", "", line.lstrip("#").strip().lower())
        for line in operations.splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in headings, f"docs/OPERATIONS.md has no section for {rule['alert']}"


def test_every_alert_has_a_promtool_unit_test() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "kiln-alerts.test.yaml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert {rule["alert"] for rule in alert_rules()} <= tested


def test_dashboard_shows_what_operators_need() -> None:
    exprs = "\n".join(dashboard_expressions())
    for quantile in ("0.5", "0.9", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le) (rate(kiln_request_duration_seconds_bucket" in exprs
        )
    assert "rate(kiln_inferences_total" in exprs  # throughput
    assert "kiln_batch_size_bucket" in exprs  # batch size distribution
    assert any(p["type"] == "heatmap" for p in dashboard_panels())
    assert "kiln_queue_depth" in exprs
    assert "kiln_engine_builds_total" in exprs
    assert "nv_gpu_utilization" in exprs


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"] == "kiln-overview"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in data["templating"]["list"]}
    assert "datasource" in variables
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_kubernetes_scrape_config_keeps_namespace_and_pod_labels() -> None:
    # Debian's promtool is built without Kubernetes service discovery, so this
    # file is checked here rather than by `promtool check config`.
    config = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "kiln"  # KilnTargetDown matches job=~".*kiln.*"
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label"): r["source_labels"] for r in job["relabel_configs"]}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert config["rule_files"] == ["rules/*.yaml"]


def test_compose_stack_wires_kiln_prometheus_and_grafana() -> None:
    compose_file = DEPLOY / "compose.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    services = compose["services"]
    assert set(services) == {"kiln", "prometheus", "grafana"}

    kiln = services["kiln"]
    assert kiln["build"]["target"] == "cpu"
    assert (compose_file.parent / kiln["build"]["context"] / kiln["build"]["dockerfile"]).is_file()
    assert kiln["read_only"] is True
    assert "kiln-store:/var/lib/kiln/store" in kiln["volumes"]

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["kiln:8000"]

    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        for spec in service.get("volumes", []):
            source = spec.split(":", 1)[0]
            if source.startswith("."):
                assert (compose_file.parent / source).exists(), f"{name}: {source} does not exist"

    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert Path(grafana_mounts["./grafana/dashboards"]) == Path("/var/lib/grafana/dashboards")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kiln.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
