"""Models with external data through the HTTP API, as a user of torch's dynamo
exporter sends them: the graph with ``model_data`` parts, or one archive; bad
uploads are 400s that name the problem; the stored package survives a restart."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli.main import main
from service.settings import Settings
from tests.conftest import wait_for_state
from tests.external_data_models import package_members, reference, tar_bytes, with_location, zip_bytes

MAX_UPLOAD = 512 * 1024


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extdata-store")


def settings(store: Path) -> Settings:
    return Settings(store=store, backend="onnxruntime", max_batch_size=4, max_upload_bytes=MAX_UPLOAD)


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(store))) as test_client:
        yield test_client


def post(client: TestClient, name: str, files: list[tuple[str, tuple[str, bytes]]], **fields: Any):
    return client.post("/engines", files=files, data={"name": name, **fields})


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)}


def assert_serves_like_the_export(client: TestClient, name: str, dynamo_model: Path) -> None:
    for batch in (1, 3):
        x = feeds(batch)
        response = client.post("/predict", json={"engine": name, "inputs": x["image"].tolist()})
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["outputs"]["logits"], dtype=np.float32)
        np.testing.assert_allclose(got, reference(dynamo_model, x)["logits"], atol=1e-5, rtol=0)


def test_dynamo_export_uploaded_as_parts_and_as_archives_is_served(
    client: TestClient, dynamo_model: Path, store: Path
) -> None:
    members = package_members(dynamo_model)
    uploads = {
        "parts": [
            ("model", ("model.onnx", members["model.onnx"])),
            ("model_data", ("model.onnx.data", members["model.onnx.data"])),
        ],
        "zipped": [("model", ("model.zip", zip_bytes(members)))],
        "tarred": [("model", ("model.tar.gz", tar_bytes(list(members.items()), gzip=True)))],
    }
    for name, files in uploads.items():
        assert post(client, name, files).status_code == 202
    statuses = [wait_for_state(client, name) for name in uploads]
    assert [s["state"] for s in statuses] == ["ready"] * 3, statuses
    shas = {s["model_sha256"] for s in statuses}
    assert len(shas) == 1  # one content address, stored once
    package = store / "models" / shas.pop()
    assert sorted(p.name for p in package.iterdir()) == ["model.onnx", "model.onnx.data"]
    for name in uploads:
        assert_serves_like_the_export(client, name, dynamo_model)


def test_a_restart_rebuilds_from_the_stored_package(
    client: TestClient, dynamo_model: Path, store: Path, tmp_path: Path
) -> None:
    """A copy of the store without its engines: every version is rebuilt from the
    stored graph and data files alone."""
    members = package_members(dynamo_model)
    files = [("model", ("m.zip", zip_bytes(members)))]
    assert post(client, "restarted", files).status_code == 202
    assert wait_for_state(client, "restarted")["state"] == "ready"
    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("engines", "tmp"))
    with TestClient(create_app(settings(copy))) as restarted:
        status = wait_for_state(restarted, "restarted")
        assert status["state"] == "ready", status
        assert_serves_like_the_export(restarted, "restarted", dynamo_model)


def _bad_uploads(graph: Path) -> dict[str, tuple[list[tuple[str, tuple[str, bytes]]], str]]:
    m = package_members(graph)
    bomb = {**m, "model.onnx.data": m["model.onnx.data"] + b"\0" * (8 * MAX_UPLOAD)}
    return {
        "data file not sent": (
            [("model", ("model.onnx", m["model.onnx"]))],
            "keeps its data in 'model.onnx.data', which is not in the upload: send that file",
        ),
        "absolute reference": (
            [
                ("model", ("model.onnx", with_location(graph, "/etc/passwd"))),
                ("model_data", ("model.onnx.data", m["model.onnx.data"])),
            ],
            "'/etc/passwd' is an absolute path",
        ),
        "dot-dot reference": (
            [
                ("model", ("model.onnx", with_location(graph, "../../../etc/passwd"))),
                ("model_data", ("model.onnx.data", m["model.onnx.data"])),
            ],
            "climbs out of its directory with '..'",
        ),
        "reference to a file not in the upload": (
            [
                ("model", ("model.onnx", with_location(graph, "weights.bin"))),
                ("model_data", ("model.onnx.data", m["model.onnx.data"])),
            ],
            "keeps its data in 'weights.bin', which is not in the upload",
        ),
        "dot-dot data part": (
            [
                ("model", ("model.onnx", m["model.onnx"])),
                ("model_data", ("../model.onnx.data", m["model.onnx.data"])),
            ],
            "'../model.onnx.data' climbs out of its directory",
        ),
        "symlink in an archive": (
            [("model", ("m.tar", _tar_with_link(m, "sym")))],
            "'model.onnx.data' is a symbolic link",
        ),
        "hardlink in an archive": (
            [("model", ("m.tar", _tar_with_link(m, "hard")))],
            "'model.onnx.data' is a hard link",
        ),
        "archive member outside": (
            [("model", ("m.zip", zip_bytes({"model.onnx": m["model.onnx"], "../x.data": b"1"})))],
            "'../x.data' climbs out of its directory",
        ),
        "zip bomb": (
            [("model", ("m.zip", zip_bytes(bomb)))],
            f"more than {MAX_UPLOAD} bytes (unpacked), the upload limit",
        ),
        "tar.gz bomb": (
            [("model", ("m.tgz", tar_bytes(list(bomb.items()), gzip=True)))],
            f"more than {MAX_UPLOAD} bytes (unpacked), the upload limit",
        ),
    }


def _tar_with_link(members: dict[str, bytes], kind: str) -> bytes:
    import tarfile

    link = tarfile.TarInfo("model.onnx.data")
    link.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
    link.linkname = "/etc/passwd" if kind == "sym" else "model.onnx"
    return tar_bytes([("model.onnx", members["model.onnx"]), link])


BAD = [
    "data file not sent",
    "absolute reference",
    "dot-dot reference",
    "reference to a file not in the upload",
    "dot-dot data part",
    "symlink in an archive",
    "hardlink in an archive",
    "archive member outside",
    "zip bomb",
    "tar.gz bomb",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_uploads_are_400s_that_name_the_problem(
    client: TestClient, dynamo_model: Path, store: Path, case: str
) -> None:
    files, message = _bad_uploads(dynamo_model)[case]
    models_before = sorted(p.name for p in (store / "models").iterdir())
    response = post(client, "bad", files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_model"
    assert message in response.json()["error"]["message"]
    assert sorted(p.name for p in (store / "models").iterdir()) == models_before
    assert list((store / "tmp").iterdir()) == []
    assert client.get("/engines/bad").status_code == 404


def test_data_parts_over_the_upload_limit_are_cut_off(client: TestClient, dynamo_model: Path) -> None:
    m = package_members(dynamo_model)
    files = [
        ("model", ("model.onnx", m["model.onnx"])),
        ("model_data", ("a.bin", b"\0" * (MAX_UPLOAD // 2 + 1))),
        ("model_data", ("b.bin", b"\0" * (MAX_UPLOAD // 2 + 1))),
    ]
    response = post(client, "toolarge", files)
    assert response.status_code == 413
    assert "'model_data' is larger than its limit" in response.json()["error"]["message"]


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_kiln_build_takes_the_export_folder_or_an_archive(
    tmp_path: Path, dynamo_model: Path, form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if form == "folder":
        source = dynamo_model
    else:
        source = tmp_path / "export.tar.gz"
        source.write_bytes(tar_bytes(list(package_members(dynamo_model).items()), gzip=True))
    store = tmp_path / "store"
    assert main(["build", str(source), "--store", str(store), "--backend", "onnxruntime"]) == 0
    name = "model" if form == "folder" else "export"
    assert f'"name": "{name}"' in capsys.readouterr().out
    with TestClient(create_app(settings(store))) as served:
        assert wait_for_state(served, name)["state"] == "ready"
        assert_serves_like_the_export(served, name, dynamo_model)
        metrics = served.get("/metrics").text
        assert 'kiln_engine_builds_total{result="cached"} 1.0' in metrics
