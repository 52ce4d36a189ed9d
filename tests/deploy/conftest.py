"""Fixtures for the deploy checks: the validation tools and chart renders.

The tools come from ``deploy/tools/install.sh`` (run once per session; a rerun
with everything in place takes about a second). Every test here is marked
``deploy``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
CHART = ROOT / "helm" / "kiln"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
CPU_VALUES = CHART / "ci" / "cpu-values.yaml"
KUBE_VERSION = "1.33.0"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
CRD_APIS = (SERVICE_MONITOR_API, PROMETHEUS_RULE_API)


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    """The command and everything it printed, for assertion messages."""
    return f"$ {' '.join(map(str, proc.args))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@dataclass(frozen=True)
class Tools:
    """Paths of the installed tools and a runner with the right environment."""

    helm: Path
    lint_bin: Path
    checkov: Path
    promtool: Path | None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{TOOLS / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["HELM_CACHE_HOME"] = str(TOOLS / "h" / "cache")
        env["HELM_CONFIG_HOME"] = str(TOOLS / "h" / "cfg")
        env["HELM_DATA_HOME"] = str(TOOLS / "h" / "data")
        return env

    def run(self, args: Sequence[str | Path], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def template(
        self,
        *values_files: Path,
        set_values: Sequence[str] = (),
        api_versions: Sequence[str] = CRD_APIS,
    ) -> subprocess.CompletedProcess[str]:
        """``helm template`` of the chart into namespace ``kiln``."""
        args: list[str | Path] = [self.helm, "template", "kiln", CHART, "-n", "kiln"]
        args += ["--kube-version", KUBE_VERSION]
        for api in api_versions:
            args += ["--api-versions", api]
        for path in values_files:
            args += ["-f", path]
        for item in set_values:
            args += ["--set", item]
        return self.run(args)

    def render(
        self,
        *values_files: Path,
        set_values: Sequence[str] = (),
        api_versions: Sequence[str] = CRD_APIS,
    ) -> list[dict[str, Any]]:
        """Render and parse; fails the test with helm's output if rendering fails."""
        proc = self.template(*values_files, set_values=set_values, api_versions=api_versions)
        assert proc.returncode == 0, output_of(proc)
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def tools() -> Tools:
    subprocess.run(["bash", str(ROOT / "deploy" / "tools" / "install.sh")], cwd=ROOT, check=True)
    promtool = TOOLS / "bin" / "promtool"
    found = shutil.which("promtool")
    return Tools(
        helm=TOOLS / "bin" / "helm",
        lint_bin=TOOLS / "venv-lint" / "bin",
        checkov=TOOLS / "venv-checkov" / "bin" / "checkov",
        promtool=promtool if promtool.exists() else (Path(found) if found else None),
    )


@pytest.fixture(scope="session")
def gpu_docs(tools: Tools) -> list[dict[str, Any]]:
    return tools.render(GPU_VALUES)


@pytest.fixture(scope="session")
def cpu_docs(tools: Tools) -> list[dict[str, Any]]:
    return tools.render(CPU_VALUES)


@pytest.fixture(scope="session")
def default_docs(tools: Tools) -> list[dict[str, Any]]:
    return tools.render()


@pytest.fixture(scope="session")
def render_files(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The GPU and CPU renders as files, for the tools that read files."""
    directory = tmp_path_factory.mktemp("render")
    files = {}
    for name, values in (("gpu", GPU_VALUES), ("cpu", CPU_VALUES)):
        proc = tools.template(values)
        assert proc.returncode == 0, output_of(proc)
        files[name] = directory / f"{name}.yaml"
        files[name].write_text(proc.stdout)
    return files


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kiln_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "kiln")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}
