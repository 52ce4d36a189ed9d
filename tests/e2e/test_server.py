"""End to end through a real uvicorn process: upload, predict, restart, crashes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess
from tests.models import reference_outputs

pytestmark = pytest.mark.slow


def sample_value(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_upload_predict_restart_and_serve_again(tmp_path: Path, model_files: dict[str, Path]) -> None:
    store = tmp_path / "store"
    feeds = {"a": np.ones((2, 4), np.float32), "b": np.full((2, 4), 3, np.float32)}
    with ServerProcess(store) as server, server.client() as client:
        upload(client, model_files["two_in_two_out"], "pair")
        upload(client, model_files["mlp"], "mlp")
        assert wait_for_state(client, "pair")["state"] == "ready"
        assert wait_for_state(client, "mlp")["state"] == "ready"
        first = client.post(
            "/predict", json={"engine": "pair", "inputs": {k: v.tolist() for k, v in feeds.items()}}
        )
        assert first.status_code == 200
    # Same store, new process: ready engines come back without a rebuild.
    with ServerProcess(store) as server, server.client() as client:
        status = wait_for_state(client, "pair")
        assert status["state"] == "ready"
        again = client.post(
            "/predict", json={"engine": "pair", "inputs": {k: v.tolist() for k, v in feeds.items()}}
        )
        assert again.json() == first.json()
        want = reference_outputs(model_files["two_in_two_out"], feeds)
        for key, value in want.items():
            np.testing.assert_allclose(np.asarray(again.json()["outputs"][key]), value, atol=1e-5)
        metrics = client.get("/metrics").text
        assert sample_value(metrics, "kiln_engine_builds_total", result="succeeded") == 0
        assert sample_value(metrics, "kiln_engine_builds_total", result="cached") == 2


def test_a_killed_build_child_is_retried_and_touches_nothing_else(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    store = tmp_path / "store"
    with ServerProcess(store, KILN_BUILD_RETRY_BACKOFF_S="0.2") as server, server.client() as client:
        upload(client, model_files["mlp"], "survivor")
        assert wait_for_state(client, "survivor")["state"] == "ready"
        assert server.process is not None
        parent = psutil.Process(server.process.pid)
        # Without a baseline engine, the version's fate is its build's.
        upload(client, model_files["cnn"], "victim", progressive="false")
        # The build runs in a child process: kill it as soon as it appears.
        deadline = time.monotonic() + 30
        killed = False
        while time.monotonic() < deadline and not killed:
            for child in parent.children(recursive=True):
                if "multiprocessing" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(
                    child.cmdline()
                ):
                    child.kill()
                    killed = True
                    break
            time.sleep(0.01)
        assert killed, "no build child appeared"
        # A crash is not the model's fault: the build is tried again, and succeeds.
        assert wait_for_state(client, "victim")["state"] == "ready"
        metrics = client.get("/metrics").text
        assert sample_value(metrics, "kiln_engine_builds_total", result="failed") == 1
        assert "SIGKILL" in server.log.read_text()  # the failed attempt, in the log
        response = client.post("/predict", json={"engine": "survivor", "inputs": [[0.0] * 16]})
        assert response.status_code == 200
        assert client.get("/health/ready").status_code == 200


def test_concurrent_requests_share_engine_runs(tmp_path: Path, model_files: dict[str, Path]) -> None:
    with ServerProcess(tmp_path / "store") as server, server.client() as client:
        upload(client, model_files["mlp"], "shared", max_queue_delay_ms="20", max_batch_size="16")
        assert wait_for_state(client, "shared")["state"] == "ready"
        before = sample_value(client.get("/metrics").text, "kiln_batches_total", engine="shared")

        async def burst(count: int) -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as session:
                body = {"engine": "shared", "inputs": [[0.1] * 16]}
                responses = await asyncio.gather(*(session.post("/predict", json=body) for _ in range(count)))
                return [r.status_code for r in responses]

        codes = asyncio.run(burst(64))
        assert codes == [200] * 64
        metrics = client.get("/metrics").text
        runs = sample_value(metrics, "kiln_batches_total", engine="shared") - before
        rows = sample_value(metrics, "kiln_inferences_total", engine="shared")
        assert rows >= 64
        assert 0 < runs < 64, f"{runs} engine runs for 64 requests: no batching happened"
