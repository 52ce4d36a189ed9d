"""Acceptance of cluster mode: real ``kiln serve`` processes on 127.0.0.1, one store,
one real PostgreSQL catalog, a 2 s build lease and a 0.5 s resync."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.postgres import PostgresServer
from tests.cluster.replicas import Replicas, metric, outputs, predict, replica_id, wait_until
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess
from tests.models import mlp

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

BUILD_PHASES = ("validate", "precision", "build", "accuracy", "profile", "commit")


def test_an_upload_on_one_replica_is_served_by_another_within_2_s(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a, b = replicas.start(), replicas.start()
    with a.client() as client:
        upload(client, model_files["mlp"], "m")
        assert wait_for_state(client, "m")["state"] == "ready"
    ready_at = time.monotonic()
    expected = outputs(a, "m")
    wait_until(lambda: outputs(b, "m") == expected, 2.0, "B serves A's upload")
    assert time.monotonic() - ready_at < 2.0
    with b.client() as client:
        wait_until(lambda: client.get("/engines/m").json()["replicas"] == {"ready": 2}, 5, "two ready")
        status = client.get("/engines/m").json()
    assert status["state"] == "ready" and status["catalog_state"] == "ready"
    for server in (a, b):
        wait_until(
            lambda s=server: metric(s, "kiln_catalog_replicas_ready", engine="m", version="1") == 2,
            5,
            "the gauge counts both replicas",
        )
        assert metric(server, "kiln_catalog_up") == 1
        assert metric(server, "kiln_catalog_reconcile_lag_seconds") < 5


def test_concurrent_uploads_of_one_name_get_distinct_versions(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a, b = replicas.start(), replicas.start()
    answers: list[dict] = []

    def send(server: ServerProcess) -> None:
        with server.client() as client:
            answers.append(upload(client, model_files["mlp"], "m"))

    threads = [threading.Thread(target=send, args=(s,)) for s in (a, b, a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answer["version"] for answer in answers) == [1, 2, 3, 4]
    for server in (a, b):
        with server.client() as client:
            wait_until(
                lambda c=client: all(wait_for_state(c, "m", v)["state"] == "ready" for v in (1, 2, 3, 4)),
                60,
                "every version ready",
            )
            assert [v["version"] for v in client.get("/engines/m").json()["versions"]] == [1, 2, 3, 4]


def test_the_same_model_on_two_replicas_at_once_is_built_once(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a, b = replicas.start(), replicas.start()
    threads = [
        threading.Thread(target=lambda s=s: upload(s.client(), model_files["cnn"], "m")) for s in (a, b)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for server in (a, b):
        with server.client() as client:
            for version in (1, 2):
                assert wait_for_state(client, "m", version)["state"] == "ready"
    built = sum(metric(s, "kiln_engine_builds_total", result="succeeded") for s in (a, b))
    assert built == 1
    skipped_or_cached = sum(
        metric(s, "kiln_catalog_builds_skipped_total")
        + metric(s, "kiln_engine_builds_total", result="cached")
        for s in (a, b)
    )
    assert skipped_or_cached == 3  # four loads in all, one build
    assert len(replicas.artifacts()) == 1


def test_a_delete_on_one_replica_stops_the_others_and_keeps_shared_blobs(
    replicas: Replicas, model_files: dict[str, Path], tmp_path: Path
) -> None:
    a, b = replicas.start(), replicas.start()
    other = mlp(tmp_path / "other.onnx", seed=5)
    with a.client() as client:
        upload(client, model_files["mlp"], "m")  # v1
        upload(client, model_files["mlp"], "m")  # v2: the same model and engine as v1
        upload(client, other, "m")  # v3
        for version in (1, 2, 3):
            assert wait_for_state(client, "m", version)["state"] == "ready"
    wait_until(lambda: outputs(b, "m", 2) is not None, 5, "B serves v2")
    before = {v: outputs(a, "m", v) for v in (1, 3)}
    with b.client() as client:
        assert client.delete("/engines/m/versions/2").json() == {"name": "m", "deleted_versions": [2]}
    deleted_at = time.monotonic()
    wait_until(lambda: predict(a, "m", 2).status_code == 404, 2.0, "A stops serving v2")
    assert time.monotonic() - deleted_at < 2.0
    assert len(replicas.artifacts()) == 2  # v1 still uses the engine v2 shared
    assert len(list((replicas.store / "models").iterdir())) == 2
    for server in (a, b):
        assert server.stop() == 0
    a, b = replicas.start(), replicas.start()
    for server in (a, b):
        with server.client() as client:
            assert [v["version"] for v in client.get("/engines/m").json()["versions"]] == [1, 3]
            for version in (1, 3):
                assert wait_for_state(client, "m", version)["state"] == "ready"
                assert outputs(server, "m", version) == before[version]


def test_a_killed_lease_holder_is_taken_over_and_one_artifact_is_committed(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    servers = [replicas.start(), replicas.start()]
    with servers[0].client() as client:
        upload(client, model_files["cnn"], "m", progressive="false")  # no baseline: nothing to serve yet
    row = wait_until(lambda: replicas.build_row("m"), 10, "a build lease")
    assert row[0] == "building"
    holder = next(s for s in servers if replica_id(s) == row[1])
    survivor = next(s for s in servers if s is not holder)
    assert holder.stop(signal.SIGKILL) == -signal.SIGKILL
    # It exists, but the lease has not expired yet: retry later, not "no such version".
    image = {"image": [[[[0.0] * 16] * 16] * 3]}  # the cnn's input, one image
    body = {"engine": "m", "version": 1, "inputs": image}
    waiting = wait_until(
        lambda: (r := httpx.post(f"{survivor.url}/predict", json=body, timeout=10)).status_code != 404 and r,
        5,
        "adopted",
    )
    assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "1"
    assert "not ready on this replica yet" in waiting.json()["error"]["message"]
    with survivor.client() as client:
        assert wait_for_state(client, "m", 1, timeout_s=120)["state"] == "ready"
    state, new_holder, generation, meta = replicas.build_row("m")  # type: ignore[misc]
    assert state == "committed" and new_holder != row[1] and generation == row[2] + 1
    assert metric(survivor, "kiln_catalog_lease_takeovers_total") == 1
    assert [p.name for p in replicas.artifacts()] == [meta["artifact"].split("/")[0]]


def test_a_builder_stopped_past_its_lease_cannot_commit(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    servers = [replicas.start(), replicas.start()]
    with servers[0].client() as client:
        upload(client, model_files["cnn"], "m")
    row = wait_until(lambda: replicas.build_row("m"), 10, "a build lease")
    stopped = next(s for s in servers if replica_id(s) == row[1])
    winner = next(s for s in servers if s is not stopped)
    with stopped.client() as client:  # its build child runs (it goes on while its server is stopped)
        wait_until(lambda: client.get("/engines/m/versions/1").json()["phase"] in BUILD_PHASES, 30, "a build")
    assert stopped.process is not None
    stopped.process.send_signal(signal.SIGSTOP)
    try:
        with winner.client() as client:
            assert wait_for_state(client, "m", 1, timeout_s=120)["state"] == "ready"
    finally:
        stopped.process.send_signal(signal.SIGCONT)
    committed = replicas.build_row("m")
    assert committed is not None and committed[1] != row[1]
    with stopped.client() as client:
        assert wait_for_state(client, "m", 1, timeout_s=60)["state"] == "ready"
    assert metric(stopped, "kiln_catalog_commits_refused_total") == 1
    assert "refused: its build lease passed to another replica" in stopped.log.read_text()
    # Its own file is gone; only the committed artifact is left (when both builds
    # produced the same bytes, that one file is the winner's).
    assert [p.name for p in replicas.artifacts()] == [committed[3]["artifact"].split("/")[0]]
    assert outputs(stopped, "m") == outputs(winner, "m")


def test_a_database_restart_under_load_fails_no_prediction(
    replicas: Replicas, postgres: PostgresServer, model_files: dict[str, Path], tmp_path: Path
) -> None:
    a, b = replicas.start(), replicas.start()
    with a.client() as client:
        upload(client, model_files["mlp"], "m")
        assert wait_for_state(client, "m")["state"] == "ready"
    wait_until(lambda: outputs(b, "m") is not None, 5, "B serves m")
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                for server in (a, b):
                    codes.append(
                        client.post(
                            f"{server.url}/predict", json={"engine": "m", "inputs": [[0.0] * 16]}
                        ).status_code
                    )

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        postgres.stop()
        with a.client() as client:
            down = client.get("/engines")
            assert down.status_code == 503 and down.headers["Retry-After"]
            assert "catalog is unavailable" in down.json()["error"]["message"]
            assert client.get("/health/ready").status_code == 200
        time.sleep(1.0)
        postgres.start()
        with a.client() as client:
            wait_until(lambda: client.get("/engines").status_code == 200, 15, "management is back", 0.2)
            upload(client, mlp(tmp_path / "after.onnx", seed=9), "m")
        wait_until(lambda: outputs(b, "m", 2) is not None, 10, "B serves the upload made after the restart")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert len(codes) > 50 and set(codes) == {200}


def test_a_replica_started_later_serves_every_ready_version_without_building(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a = replicas.start()
    with a.client() as client:
        upload(client, model_files["mlp"], "m")
        upload(client, model_files["cnn"], "c")
        assert wait_for_state(client, "m")["state"] == wait_for_state(client, "c")["state"] == "ready"
    late = replicas.start()
    with late.client() as client:
        assert wait_for_state(client, "m")["state"] == wait_for_state(client, "c")["state"] == "ready"
    assert outputs(late, "m") == outputs(a, "m")
    assert metric(late, "kiln_engine_builds_total", result="succeeded") == 0
    assert metric(late, "kiln_engine_builds_total", result="cached") == 2


def test_a_second_single_node_server_on_the_same_store_refuses_to_start(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with ServerProcess(store):
        second = subprocess.run(
            [str(Path(sys.executable).with_name("kiln")), "serve", "--port", "0", "--store", str(store)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert second.returncode == 1
    assert "is in use by pid" in second.stderr and "KILN_CATALOG_URL=postgresql://" in second.stderr


def test_a_progressive_upload_serves_on_baselines_everywhere_and_builds_once(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a, b = replicas.start(), replicas.start()
    with a.client() as client:
        upload(client, model_files["cnn"], "m", progressive="true")
    for server in (a, b):
        with server.client() as client:
            status = wait_for_state(client, "m", 1, timeout_s=120, states=("ready", "failed"))
            assert status["state"] == "ready" and status["serving"]["tier"] == "optimized", status
        assert "serves on its baseline engine" in server.log.read_text()
    assert sum(metric(s, "kiln_engine_builds_total", result="succeeded") for s in (a, b)) == 1
    assert outputs(a, "m") == outputs(b, "m")
