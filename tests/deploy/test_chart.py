"""What the rendered chart must say, with the GPU on and off."""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    CHART,
    CPU_VALUES,
    GPU_VALUES,
    PROMETHEUS_RULE_API,
    ROOT,
    SERVICE_MONITOR_API,
    Tools,
    env_of,
    find,
    kiln_container,
    one,
    output_of,
)

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

Docs = list[dict[str, Any]]
ADAPTER_RULES = CHART / "files" / "prometheus-adapter-rules.yaml"


def pod_spec(docs: Docs) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def volume(docs: Docs, name: str) -> dict[str, Any]:
    return next(v for v in pod_spec(docs)["volumes"] if v["name"] == name)


def mount(container: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in container["volumeMounts"] if m["name"] == name)


def test_gpu_limit_and_toleration_only_when_gpu_enabled(gpu_docs: Docs, cpu_docs: Docs) -> None:
    gpu_container, cpu_container = kiln_container(gpu_docs), kiln_container(cpu_docs)

    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in gpu_container["resources"].get("requests", {})
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(gpu_docs)[
        "tolerations"
    ]
    assert pod_spec(gpu_docs)["runtimeClassName"] == "nvidia"
    assert env_of(gpu_container)["KILN_BACKEND"] == "tensorrt"
    assert ":0.1.0-gpu@sha256:" in gpu_container["image"]

    cpu_resources = yaml.safe_dump(cpu_container["resources"])
    assert "nvidia.com" not in cpu_resources
    assert "nvidia.com" not in yaml.safe_dump(pod_spec(cpu_docs).get("tolerations", []))
    assert "runtimeClassName" not in pod_spec(cpu_docs)
    assert env_of(cpu_container)["KILN_BACKEND"] == "onnxruntime"
    assert ":0.1.0-cpu@sha256:" in cpu_container["image"]


def test_gpu_resource_name_is_configurable_for_mig(tools: Tools) -> None:
    docs = tools.render(GPU_VALUES, set_values=["gpu.resourceName=nvidia.com/mig-1g.10gb"])
    limits = kiln_container(docs)["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == 1
    assert "nvidia.com/gpu" not in limits


def test_time_sliced_gpu_allows_one_per_pod(tools: Tools) -> None:
    proc = tools.template(GPU_VALUES, set_values=["gpu.resourceName=nvidia.com/gpu.shared", "gpu.count=2"])
    assert proc.returncode != 0, output_of(proc)
    assert "gpu.count must be 1" in proc.stderr


@pytest.mark.parametrize("flavour", ["gpu", "cpu", "default"])
def test_probes_use_kiln_health_endpoints(
    flavour: str, gpu_docs: Docs, cpu_docs: Docs, default_docs: Docs
) -> None:
    docs = {"gpu": gpu_docs, "cpu": cpu_docs, "default": default_docs}[flavour]
    container = kiln_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env_of(container)["KILN_PORT"]) == 8000

    # Start-up ends when restored engines serve, not when the process answers.
    assert container["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    startup = container["startupProbe"]
    # A TensorRT engine build can take many minutes: at least 15 before liveness counts.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


def test_probe_paths_are_routes_the_server_declares() -> None:
    routes = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    for path in ("/health/live", "/health/ready"):
        assert f'"{path}"' in routes, f"{path} is not a route in service/"


def test_server_listens_on_all_interfaces_inside_the_pod(gpu_docs: Docs) -> None:
    container = kiln_container(gpu_docs)
    assert env_of(container)["KILN_HOST"] == "0.0.0.0"
    args = container["args"]
    assert args[0] == "serve"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "8000"


@pytest.mark.parametrize("flavour", ["gpu", "cpu"])
def test_store_is_the_pvc_mounted_where_kiln_store_points(
    flavour: str, gpu_docs: Docs, cpu_docs: Docs
) -> None:
    docs = gpu_docs if flavour == "gpu" else cpu_docs
    container = kiln_container(docs)
    store_path = env_of(container)["KILN_STORE"]
    assert container["args"][container["args"].index("--store") + 1] == store_path
    assert mount(container, "store")["mountPath"] == store_path
    assert not mount(container, "store").get("readOnly", False)

    pvc = one(docs, "PersistentVolumeClaim")
    claim = volume(docs, "store")["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_rwo_store_recreates_and_rwx_store_rolls(gpu_docs: Docs, cpu_docs: Docs) -> None:
    gpu_pvc, cpu_pvc = (
        one(gpu_docs, "PersistentVolumeClaim"),
        one(cpu_docs, "PersistentVolumeClaim"),
    )
    assert gpu_pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert one(gpu_docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    assert cpu_pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(cpu_docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("flavour", ["gpu", "cpu", "default"])
def test_runs_non_root_with_read_only_root_filesystem(
    flavour: str, gpu_docs: Docs, cpu_docs: Docs, default_docs: Docs
) -> None:
    docs = {"gpu": gpu_docs, "cpu": cpu_docs, "default": default_docs}[flavour]
    pod = pod_spec(docs)
    container = kiln_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # With a read-only root, /tmp (and HOME, for TensorRT/CUDA caches) is an emptyDir.
    assert mount(container, "tmp")["mountPath"] == "/tmp"
    assert "emptyDir" in volume(docs, "tmp")
    assert env_of(container)["HOME"] == "/tmp"


def test_resources_have_requests_and_limits(gpu_docs: Docs, cpu_docs: Docs) -> None:
    for docs in (gpu_docs, cpu_docs):
        resources = kiln_container(docs)["resources"]
        for key in ("cpu", "memory"):
            assert key in resources["requests"]
            assert key in resources["limits"]


def adapter_rules() -> dict[str, dict[str, Any]]:
    """The adapter's rules by the metric name each exports."""
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}


def test_hpa_targets_the_load_ratio_the_adapter_rule_exports(gpu_docs: Docs) -> None:
    rules = adapter_rules()
    assert set(rules) == {"kiln_load_ratio", "kiln_queue_duration_seconds_avg"}
    load = rules["kiln_load_ratio"]
    assert "kiln_engine_load_ratio" in load["seriesQuery"]
    assert load["metricsQuery"] == "sum(kiln_engine_load_ratio{<<.LabelMatchers>>}) by (<<.GroupBy>>)"
    queue = rules["kiln_queue_duration_seconds_avg"]["metricsQuery"]
    assert "kiln_queue_duration_seconds_sum{<<.LabelMatchers>>}" in queue
    assert "kiln_queue_duration_seconds_count{<<.LabelMatchers>>}" in queue
    for rule in rules.values():
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    rule = load

    hpa = one(gpu_docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one(gpu_docs, "Deployment")["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # The HPA owns the replica count.
    assert "replicas" not in one(gpu_docs, "Deployment")["spec"]


def test_adapter_rule_is_documented_identically() -> None:
    deployed = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
    assert deployed.read_text() == ADAPTER_RULES.read_text(), f"{deployed} differs from {ADAPTER_RULES}"

    def squash(text: str) -> str:
        return re.sub(r"[\s#]+", " ", text)

    for rule in adapter_rules().values():
        query = squash(rule["metricsQuery"])
        for doc in (CHART / "values.yaml", ROOT / "docs" / "OPERATIONS.md"):
            assert query in squash(doc.read_text()), f"{doc} does not show the adapter rule's query"


def render_notes(tools: Tools, workdir: Path, *values_files: Path, set_values: Sequence[str] = ()) -> str:
    """NOTES.txt as an install would print it.

    ``helm template`` skips NOTES.txt and ``helm install --dry-run`` needs a
    cluster, so a copy of the chart renders it into a ConfigMap instead.
    """
    chart = workdir / "kiln"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "NOTES.txt").unlink()
        (chart / "templates" / "_notes.tpl").write_text(
            '{{- define "test.notes" -}}\n' + notes + "{{- end }}\n"
        )
        (chart / "templates" / "notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
            'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
        )
    args: list[str | Path] = [tools.helm, "template", "kiln", chart, "-n", "kiln"]
    for path in values_files:
        args += ["-f", path]
    for item in set_values:
        args += ["--set", item]
    proc = tools.run(args)
    assert proc.returncode == 0, output_of(proc)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    notes_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "notes")
    text: str = notes_map["data"]["notes"]
    return text


def test_notes_explain_keys_scraping_and_the_adapter_rule(
    tools: Tools, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("notes")
    gpu = render_notes(tools, workdir, GPU_VALUES)
    assert "kubectl -n kiln get secret kiln-api-keys" in gpu
    assert "generated one key" in gpu
    assert ADAPTER_RULES.read_text().strip().splitlines()[-1].strip() in gpu
    assert "kiln_load_ratio" in gpu
    assert "No ServiceMonitor" in gpu  # rendered without the CRDs
    assert "WARNING" not in gpu

    cpu = render_notes(tools, workdir, CPU_VALUES)
    assert "CPU: ONNX Runtime" in cpu
    assert "prometheus-adapter" not in cpu

    shared = render_notes(
        tools, workdir, CPU_VALUES, set_values=["replicaCount=3", "catalog.existingSecret=pg"]
    )
    assert "ReadWriteOnce store" in shared
    assert "Replicas agree through the PostgreSQL catalog in Secret pg" in shared
    assert "PostgreSQL catalog" in gpu and "PostgreSQL catalog" not in cpu

    open_server = render_notes(tools, workdir, set_values=["auth.allowUnauthenticated=true"])
    assert "WARNING: auth.allowUnauthenticated is true" in open_server


def test_no_hpa_without_autoscaling(cpu_docs: Docs) -> None:
    assert find(cpu_docs, "HorizontalPodAutoscaler") == []
    assert one(cpu_docs, "Deployment")["spec"]["replicas"] == 1


def test_monitoring_crd_objects_only_when_the_crds_exist(tools: Tools) -> None:
    without = tools.render(GPU_VALUES, api_versions=())
    assert find(without, "ServiceMonitor") == []
    assert find(without, "PrometheusRule") == []

    only_sm = tools.render(GPU_VALUES, api_versions=(SERVICE_MONITOR_API,))
    assert find(only_sm, "PrometheusRule") == []
    monitor = one(only_sm, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    service = one(only_sm, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "http" in {p["name"] for p in service["spec"]["ports"]}

    both = tools.render(GPU_VALUES, api_versions=(SERVICE_MONITOR_API, PROMETHEUS_RULE_API))
    rule = one(both, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    deployed = yaml.safe_load((ROOT / "deploy/prometheus/rules/kiln-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == deployed["groups"]


@pytest.mark.parametrize("flavour", ["gpu", "cpu", "default"])
def test_grace_period_covers_prestop_and_drain(
    flavour: str, gpu_docs: Docs, cpu_docs: Docs, default_docs: Docs
) -> None:
    docs = {"gpu": gpu_docs, "cpu": cpu_docs, "default": default_docs}[flavour]
    container = kiln_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    drain = float(env_of(container)["KILN_DRAIN_TIMEOUT_S"])
    assert pre_stop > 0
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > pre_stop + drain


def test_drain_timeout_comes_from_values(tools: Tools) -> None:
    docs = tools.render(
        GPU_VALUES,
        set_values=["server.drainTimeoutSeconds=120", "terminationGracePeriodSeconds=150"],
    )
    assert env_of(kiln_container(docs))["KILN_DRAIN_TIMEOUT_S"] == "120"
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 150


@pytest.mark.parametrize(
    "settings",
    [
        ["terminationGracePeriodSeconds=40"],  # = 10 s preStop + 30 s drain: nothing left to exit
        ["server.drainTimeoutSeconds=120"],
        ["lifecycle.preStopSleepSeconds=45"],
    ],
)
def test_chart_refuses_a_grace_period_shorter_than_the_drain(tools: Tools, settings: list[str]) -> None:
    proc = tools.template(GPU_VALUES, set_values=settings)
    assert proc.returncode != 0, output_of(proc)
    assert "terminationGracePeriodSeconds" in proc.stderr, output_of(proc)


def test_api_keys_secret_is_mounted_as_the_keys_file(gpu_docs: Docs) -> None:
    secret = one(gpu_docs, "Secret")
    container = kiln_container(gpu_docs)
    keys_file = Path(env_of(container)["KILN_API_KEYS_FILE"])
    assert "KILN_ALLOW_UNAUTHENTICATED" not in env_of(container)
    assert "KILN_API_KEYS" not in env_of(container)  # never the keys themselves in env

    keys_volume = volume(gpu_docs, "api-keys")["secret"]
    assert keys_volume["secretName"] == secret["metadata"]["name"]
    assert mount(container, "api-keys")["mountPath"] == str(keys_file.parent)
    assert mount(container, "api-keys")["readOnly"] is True
    assert [item["path"] for item in keys_volume["items"]] == [keys_file.name]
    assert keys_volume["items"][0]["key"] in secret["data"]


def test_existing_secret_is_used_instead_of_the_charts(cpu_docs: Docs) -> None:
    assert find(cpu_docs, "Secret") == []
    keys_volume = volume(cpu_docs, "api-keys")["secret"]
    assert keys_volume["secretName"] == "kiln-api-keys"
    assert keys_volume["items"] == [{"key": "keys", "path": "keys"}]
    assert env_of(kiln_container(cpu_docs))["KILN_API_KEYS_FILE"] == "/etc/kiln/secrets/keys"


def test_given_api_keys_land_in_the_secret(tools: Tools) -> None:
    docs = tools.render(GPU_VALUES, set_values=["auth.apiKeys={first-key-0123456789,second-key-0123456789}"])
    data = base64.b64decode(one(docs, "Secret")["data"]["api-keys"]).decode()
    assert data.splitlines() == ["first-key-0123456789", "second-key-0123456789"]


def test_unauthenticated_mode_is_explicit(tools: Tools) -> None:
    docs = tools.render(GPU_VALUES, set_values=["auth.allowUnauthenticated=true"])
    env = env_of(kiln_container(docs))
    assert env["KILN_ALLOW_UNAUTHENTICATED"] == "true"
    assert "KILN_API_KEYS_FILE" not in env
    assert find(docs, "Secret") == []


def test_pdb_network_policy_and_service(gpu_docs: Docs, default_docs: Docs) -> None:
    for docs in (gpu_docs, default_docs):
        selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        policy = one(docs, "NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"] == selector
        assert policy["spec"]["ingress"][0]["ports"] == [
            {"port": "http", "protocol": "TCP"},
            {"port": "grpc", "protocol": "TCP"},
        ]
        service = one(docs, "Service")
        assert service["spec"]["selector"] == selector
        assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
            ("http", "http"),
            ("grpc", "grpc"),
        ]


def test_grpc_port_and_grpc_readiness_probe(default_docs: Docs, tools: Tools) -> None:
    container = kiln_container(default_docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(env_of(container)["KILN_GRPC_PORT"]) == 8001
    assert container["args"][container["args"].index("--grpc-port") + 1] == "8001"

    docs = tools.render(set_values=["probes.readiness.protocol=grpc"])
    container = kiln_container(docs)
    assert container["readinessProbe"]["grpc"] == {"port": 8001}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"  # liveness stays HTTP

    docs = tools.render(set_values=["server.grpcPort=0"])
    assert [p["name"] for p in kiln_container(docs)["ports"]] == ["http"]
    assert [p["name"] for p in one(docs, "Service")["spec"]["ports"]] == ["http"]
    proc = tools.template(set_values=["server.grpcPort=0", "probes.readiness.protocol=grpc"])
    assert proc.returncode != 0 and "needs server.grpcPort" in proc.stderr, output_of(proc)


def test_dashboard_configmap_carries_the_dashboard(gpu_docs: Docs) -> None:
    configmap = next(c for c in find(gpu_docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    canonical = (CHART / "dashboards" / "kiln.json").read_text()
    assert configmap["data"]["kiln.json"] == canonical.rstrip("\n")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("gpu.count=0", "count"),
        ("gpu.enable=true", "enable"),
        ("server.backend=cuda", "backend"),
        ("image.digest=latest", "digest"),
    ],
)
def test_values_schema_rejects_bad_values(tools: Tools, setting: str, message: str) -> None:
    proc = tools.template(set_values=[setting])
    assert proc.returncode != 0, output_of(proc)
    assert message in proc.stderr, output_of(proc)


def test_cpu_values_file_is_cpu_mode() -> None:
    assert yaml.safe_load(CPU_VALUES.read_text())["gpu"]["enabled"] is False


def test_server_settings_come_from_values(cpu_docs: Docs, tools: Tools) -> None:
    env = env_of(kiln_container(cpu_docs))
    assert env["KILN_MAX_UPLOAD_BYTES"] == "2147483648"
    assert env["KILN_PROTECT_PREDICT"] == "true"
    assert env["KILN_LOG_JSON"] == "true"

    docs = tools.render(set_values=["store.persistence.storageClassName=-", "server.backend=auto"])
    assert one(docs, "PersistentVolumeClaim")["spec"]["storageClassName"] == ""
    assert env_of(kiln_container(docs))["KILN_BACKEND"] == "auto"
    assert "KILN_MAX_UPLOAD_BYTES" not in env_of(kiln_container(docs))


def test_require_ready_names_reach_the_server(tools: Tools) -> None:
    assert "KILN_REQUIRE_READY" not in env_of(kiln_container(tools.render(GPU_VALUES)))
    docs = tools.render(GPU_VALUES, set_values=["server.requireReady={resnet,bert}"])
    assert env_of(kiln_container(docs))["KILN_REQUIRE_READY"] == "resnet,bert"


@pytest.mark.parametrize("setting", ["replicaCount=3", "autoscaling.enabled=true"])
def test_several_replicas_need_a_catalog(tools: Tools, setting: str) -> None:
    proc = tools.template(set_values=[setting])
    assert proc.returncode != 0, output_of(proc)
    assert "replicaCount > 1 and autoscaling need a catalog: set catalog.url" in proc.stderr


@pytest.mark.parametrize(
    ("ttl", "resync", "refused_by"),
    [
        ("30", "30", "values don't meet the specifications of the schema"),  # caught by the schema's steps
        ("31", "10.6", "must be at most a third of catalog.leaseTtlSeconds (31)"),  # exactly, by the chart
    ],
)
def test_a_resync_not_well_under_the_lease_ttl_is_refused(
    tools: Tools, tmp_path: Path, ttl: str, resync: str, refused_by: str
) -> None:
    values = tmp_path / "catalog.yaml"  # --set would pass 10.6 as a string
    values.write_text(f"catalog:\n  leaseTtlSeconds: {ttl}\n  resyncSeconds: {resync}\n")
    proc = tools.template(GPU_VALUES, values)
    assert proc.returncode != 0, output_of(proc)
    assert refused_by in proc.stderr
    values.write_text(f"catalog:\n  leaseTtlSeconds: {ttl}\n  resyncSeconds: 10\n")
    assert env_of(kiln_container(tools.render(GPU_VALUES, values)))["KILN_CATALOG_RESYNC_S"] == "10"


def test_a_catalog_url_reaches_the_pod_through_a_secret(tools: Tools) -> None:
    url = "postgresql://kiln:s3cret@pg.db:5432/kiln"
    docs = tools.render(
        set_values=[
            "replicaCount=3",
            f"catalog.url={url}",
            "store.persistence.accessModes={ReadWriteMany}",
        ]
    )
    secret = next(d for d in find(docs, "Secret") if d["metadata"]["name"] == "kiln-catalog")
    assert base64.b64decode(secret["data"]["url"]).decode() == url
    container = kiln_container(docs)
    assert env_of(container)["KILN_CATALOG_URL_FILE"] == "/etc/kiln/catalog/url"
    assert mount(container, "catalog") == {
        "name": "catalog",
        "mountPath": "/etc/kiln/catalog",
        "readOnly": True,
    }
    assert volume(docs, "catalog")["secret"]["secretName"] == "kiln-catalog"
    assert url not in yaml.safe_dump(one(docs, "Deployment"))
    assert env_of(container)["KILN_CATALOG_LEASE_TTL_S"] == "30"
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"


def test_an_existing_catalog_secret_is_used_and_one_replica_needs_none(
    gpu_docs: Docs, cpu_docs: Docs
) -> None:
    assert env_of(kiln_container(gpu_docs))["KILN_CATALOG_URL_FILE"] == "/etc/kiln/catalog/uri"
    assert volume(gpu_docs, "catalog")["secret"]["secretName"] == "kiln-catalog-app"
    assert [d["metadata"]["name"] for d in find(gpu_docs, "Secret")] == ["kiln-api-keys"]
    assert "KILN_CATALOG_URL_FILE" not in env_of(kiln_container(cpu_docs))
