"""``kiln catalog import``: a single-node store's versions move to the catalog with
their numbers, and replicas serve them without building."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.store import EngineStore
from tests.cluster.replicas import ROWS, Replicas, metric, outputs
from tests.conftest import upload, wait_for_state
from tests.models import reference_outputs

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
    held = EngineStore(replicas.store)
    held.lock_exclusive(hint="")  # as a single-node server holds it
    busy = kiln("catalog", "import", "--store", store, KILN_CATALOG_URL=replicas.catalog_url)
    held.unlock()
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
    expected = reference_outputs(model_files["mlp"], {"x": np.array(ROWS, np.float32)})
    np.testing.assert_allclose(outputs(replica, "m", 1)["y"], expected["y"], rtol=1e-5, atol=1e-6)
    assert metric(replica, "kiln_engine_builds_total", result="succeeded") == 0


def test_kiln_build_refuses_a_store_another_process_holds(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    held = EngineStore(tmp_path / "store")
    held.lock_exclusive(hint="")
    result = kiln("build", str(model_files["mlp"]), "--store", str(held.root))
    assert result.returncode == 2 and f"in use by pid {os.getpid()}" in result.stderr
    with_catalog = kiln(
        "build", str(model_files["mlp"]), "--store", str(held.root), KILN_CATALOG_URL="postgresql://h/d"
    )
    assert with_catalog.returncode == 2 and "upload models through a server's API" in with_catalog.stderr
