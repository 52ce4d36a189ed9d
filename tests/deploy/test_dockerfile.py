"""Structure of the Dockerfile beyond what hadolint and checkov look at."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.deploy

BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|make|cmake|python3?-dev)\b")


def stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined) of each named stage."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    result: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = result.setdefault(match.group(2), [f"FROM {match.group(1)}"])
        elif current is not None:
            current.append(line)
    return result


def instruction(stage: list[str], name: str) -> list[str]:
    return [line for line in stage if line.split()[0].upper() == name]


def test_targets_and_bases() -> None:
    all_stages = stages()
    assert {"gpu", "cpu"} <= set(all_stages)
    assert all_stages["gpu"][0] == "FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}"
    assert all_stages["cpu"][0] == "FROM python:${PYTHON_TAG}"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert re.fullmatch(r"\d\d\.\d\d-py3", args["TRT_TAG"]), "pin the TensorRT container tag"
    assert "latest" not in args["PYTHON_TAG"]


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_final_stage_is_non_root_without_build_tools(target: str) -> None:
    stage = stages()[target]
    (user,) = instruction(stage, "USER")
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000
    for run in instruction(stage, "RUN"):
        assert "pip install" not in run, "install in the build stage, copy the venv"
        assert not BUILD_TOOLS.search(run), run
        assert "apt-get install" not in run, run
    assert any("--from=" in c and "/opt/venv" in c for c in instruction(stage, "COPY"))


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_healthcheck_serve_command_and_store_volume(target: str) -> None:
    stage = stages()[target]
    (healthcheck,) = instruction(stage, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])  # JSON (exec) form
    assert "/health/live" in " ".join(command)
    start_period = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start_period and int(start_period.group(1)) >= 15 * 60

    (cmd,) = instruction(stage, "CMD")
    args = json.loads(cmd[len("CMD") :])
    assert args[:3] == ["serve", "--host", "0.0.0.0"]
    assert args[args.index("--store") + 1] == "/var/lib/kiln/store"
    (volume,) = instruction(stage, "VOLUME")
    assert json.loads(volume[len("VOLUME") :]) == ["/var/lib/kiln/store"]
    (entrypoint,) = instruction(stage, "ENTRYPOINT")
    assert json.loads(entrypoint[len("ENTRYPOINT") :])[-1] == "kiln"


def test_gpu_image_uses_the_base_images_tensorrt() -> None:
    build = " ".join(stages()["gpu-build"])
    assert "--system-site-packages" in build
    assert ".[gpu]" not in build  # would let pip fetch a second TensorRT
    assert "cuda-python==" in build and "nvidia-ml-py==" in build
    assert "find_spec('tensorrt')" in build


def test_dockerignore_sends_only_the_package() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "engines", "service"}


def test_gpu_image_replaces_onnxruntime_with_onnxruntime_gpu() -> None:
    build = stages()["gpu-build"]
    runs = instruction(build, "RUN")
    (swap,) = [run for run in runs if "onnxruntime-gpu==" in run]
    # Both wheels install the `onnxruntime` module: the CPU one must go first.
    assert swap.index("uninstall --yes onnxruntime") < swap.index("onnxruntime-gpu==")
    assert runs.index(swap) > next(i for i, run in enumerate(runs) if " . " in f"{run} ")
    assert "CUDAExecutionProvider" in swap
