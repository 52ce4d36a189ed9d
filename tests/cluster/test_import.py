"""``kiln catalog import``: a single-node store's versions move to the catalog with
their numbers, and replicas serve them without building."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.replicas import Replicas, metric, outputs
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def kiln(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("kiln")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KILN_BACKEND": "onnxruntime", **env},
    )


def test_a_single_node_store_is_imported_and_served_without_building(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    store = str(replicas.store)
    for _ in range(2):
        assert kiln("build", str(model_files["mlp"]), "--store", store, "--name", "m").returncode == 0
    with ServerProcess(replicas.store) as single:
        expected = outputs(single, "m")
        busy = kiln("catalog", "import", "--store", store, KILN_CATALOG_URL=replicas.catalog_url)
        assert busy.returncode == 2 and "stop the single-node server" in busy.stderr

    imported = kiln("catalog", "import", "--store", store, KILN_CATALOG_URL=replicas.catalog_url)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"imported": ["m v1", "m v2"], "engines": 1, "skipped": []}
    again = kiln("catalog", "import", "--store", store, KILN_CATALOG_URL=replicas.catalog_url)
    assert again.returncode == 1 and "already has engines named m" in again.stderr

    replica = replicas.start()
    with replica.client() as client:
        for version in (1, 2):
            assert wait_for_state(client, "m", version)["state"] == "ready"
        assert upload(client, model_files["mlp"], "m")["version"] == 3
    assert outputs(replica, "m", 1) == expected
    assert metric(replica, "kiln_engine_builds_total", result="succeeded") == 0


def test_kiln_build_refuses_a_store_a_server_holds(tmp_path: Path, model_files: dict[str, Path]) -> None:
    store = tmp_path / "store"
    with ServerProcess(store):
        result = kiln("build", str(model_files["mlp"]), "--store", str(store))
    assert result.returncode == 2 and "in use by pid" in result.stderr
