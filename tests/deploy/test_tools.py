"""Each offline validation tool on the Dockerfile, the chart and the monitoring config.

The same checks as ``make deploy-check`` (deploy/checks.mk).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.conftest import (
    CHART,
    CPU_VALUES,
    GPU_VALUES,
    KUBE_VERSION,
    ROOT,
    Tools,
    output_of,
)

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]


@pytest.mark.parametrize("values", [None, GPU_VALUES, CPU_VALUES], ids=["default", "gpu", "cpu"])
def test_helm_lint_strict(tools: Tools, values: Path | None) -> None:
    args: list[str | Path] = [tools.helm, "lint", "--strict", CHART]
    if values is not None:
        args += ["-f", values]
    proc = tools.run(args)
    assert proc.returncode == 0, output_of(proc)
    assert "0 chart(s) failed" in proc.stdout, output_of(proc)


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_rendered_manifests_match_kubernetes_schemas(
    tools: Tools, render_files: dict[str, Path], name: str
) -> None:
    script = ROOT / "deploy" / "tools" / "validate_manifests.py"
    proc = tools.run([tools.lint_bin / "python", script, KUBE_VERSION, render_files[name]])
    assert proc.returncode == 0, output_of(proc)
    assert " 0 failed" in proc.stdout, output_of(proc)


def test_checkov_renders_and_dockerfile(tools: Tools, render_files: dict[str, Path]) -> None:
    proc = tools.run(
        [
            tools.checkov,
            "--quiet",
            "--compact",
            "--skip-download",
            "--framework",
            "kubernetes",
            "dockerfile",
            "-f",
            render_files["gpu"],
            "-f",
            render_files["cpu"],
            "-f",
            ROOT / "Dockerfile",
        ]
    )
    assert proc.returncode == 0, output_of(proc)
    assert "Failed checks: 0" in proc.stdout, output_of(proc)


def test_checkov_helm_chart(tools: Tools) -> None:
    # checkov renders the chart itself with the default values into namespace
    # "default" and without a digest: the namespace and the digest are chosen
    # at install time (CKV_K8S_21, CKV_K8S_43); the renders above check both.
    proc = tools.run(
        [
            tools.checkov,
            "--quiet",
            "--compact",
            "--skip-download",
            "--framework",
            "helm",
            "-d",
            CHART,
            "--skip-check",
            "CKV_K8S_21,CKV_K8S_43",
        ]
    )
    assert proc.returncode == 0, output_of(proc)
    assert "Failed checks: 0" in proc.stdout, output_of(proc)


def test_hadolint_dockerfile(tools: Tools) -> None:
    proc = tools.run([tools.lint_bin / "hadolint", ROOT / "Dockerfile"])
    assert proc.returncode == 0, output_of(proc)


def test_yamllint(tools: Tools) -> None:
    proc = tools.run(
        [
            tools.lint_bin / "yamllint",
            "--strict",
            "-c",
            ROOT / ".yamllint.yaml",
            "helm",
            "deploy",
            ".yamllint.yaml",
        ]
    )
    assert proc.returncode == 0, output_of(proc)


def _promtool(tools: Tools) -> Path:
    if tools.promtool is None:
        pytest.skip(
            "promtool not available: deploy/tools/install.sh takes it from Debian's "
            "prometheus package, which needs apt (run it as root once for apt-get update)"
        )
    return tools.promtool


def test_promtool_check_rules(tools: Tools) -> None:
    proc = tools.run([_promtool(tools), "check", "rules", ROOT / "deploy/prometheus/rules/kiln-alerts.yaml"])
    assert proc.returncode == 0, output_of(proc)


def test_promtool_alert_unit_tests(tools: Tools) -> None:
    proc = tools.run(
        [_promtool(tools), "test", "rules", ROOT / "deploy/prometheus/tests/kiln-alerts.test.yaml"]
    )
    assert proc.returncode == 0, output_of(proc)


def test_promtool_check_config(tools: Tools) -> None:
    proc = tools.run([_promtool(tools), "check", "config", ROOT / "deploy/prometheus/prometheus.yml"])
    assert proc.returncode == 0, output_of(proc)


def test_install_script_skips_what_is_installed(tools: Tools) -> None:
    proc = tools.run(["bash", ROOT / "deploy" / "tools" / "install.sh"], timeout=120)
    assert proc.returncode == 0, output_of(proc)
    for step in ("helm", "venv-lint", "venv-checkov"):
        assert f"install.sh: {step}" not in proc.stderr, output_of(proc)
