"""Ordinary operational events, against real processes: a real PostgreSQL, two
``kiln serve`` replicas on one store (2 s lease, 0.5 s resync), faults made for
real (the database stopped, made read-only, its LISTEN connection cut; build
children killed; a replica out of memory). Nothing is lost and nothing fails for
good."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cluster.postgres import PostgresServer
from tests.cluster.replicas import (
    LEASE_TTL_S,
    RESYNC_S,
    Replicas,
    metric,
    outputs,
    predict,
    replica_id,
    wait_until,
)
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess, build_children, gone
from tests.models import cnn, mlp

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

TTL_S = float(LEASE_TTL_S)


def builds(servers: list[ServerProcess], result: str) -> float:
    return sum(metric(s, "kiln_engine_builds_total", result=result) for s in servers)


def kiln(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("kiln")), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def sql(url: str, statement: str, *params: Any) -> None:
    """Run ``statement`` from the server's ``postgres`` database (the catalog's may refuse writes)."""
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(statement.encode(), params or None)


def test_a_database_outage_mid_build_loses_the_build_to_no_one(
    replicas: Replicas, postgres: PostgresServer, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """PostgreSQL away for 3 x the lease ttl while A builds: the build finishes
    meanwhile and is committed when the database returns (its lease's generation
    still holds); nobody builds it again."""
    a, b = replicas.start(), replicas.start()
    with a.client() as client:
        upload(client, model_files["mlp"], "m", progressive="false")
    holder = wait_until(lambda: [s for s in (a, b) if build_children(s)], 30, "a build child", 0.005)[0]
    postgres.stop()
    try:
        with b.client() as client:
            assert client.get("/engines").status_code == 503
        time.sleep(3 * TTL_S)  # the outage itself: every lease and heartbeat expires
    finally:
        postgres.start()
    for server in (a, b):
        with server.client() as client:
            assert wait_for_state(client, "m", 1, timeout_s=60)["state"] == "ready"
    assert builds([a, b], "succeeded") == 1
    assert metric(holder, "kiln_catalog_commits_refused_total") == 0
    assert sum(metric(s, "kiln_catalog_lease_takeovers_total") for s in (a, b)) == 0
    assert len(replicas.artifacts()) == 1
    # Both take uploads again, and both serve what the other took.
    after = mlp(tmp_path / "after.onnx", seed=11)
    for server in (a, b):
        with server.client() as client:
            upload(client, after, f"after-{server.port}")
    for server in (a, b):
        for name in (f"after-{a.port}", f"after-{b.port}"):
            wait_until(lambda s=server, n=name: outputs(s, n) is not None, 30, "served everywhere")


def test_a_delete_on_one_replica_stops_the_build_on_another(replicas: Replicas, tmp_path: Path) -> None:
    a, b = replicas.start(), replicas.start()
    big = cnn(tmp_path / "big.onnx", channels=64, size=128)  # several seconds to build
    with a.client() as client:
        upload(client, big, "m", progressive="false", precision="auto", calibration="synthetic")
    builder = wait_until(lambda: [s for s in (a, b) if build_children(s)], 30, "a build child", 0.005)[0]
    children = build_children(builder)
    other = b if builder is a else a  # it waits for the builder's commit
    with other.client() as client:
        assert client.delete("/engines/m").json() == {"name": "m", "deleted_versions": [1]}
    deleted_at = time.monotonic()
    for child in children:
        wait_until(lambda c=child: gone(c), 5, "the end of the build on the other replica")
    assert time.monotonic() - deleted_at < 5
    with builder.client() as client:
        assert client.get("/engines/m").status_code == 404


def test_builds_that_crash_are_retried_and_builds_the_inputs_fail_are_not(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a, b = (replicas.start(KILN_BUILD_RETRY_BACKOFF_S="0.2") for _ in range(2))
    with a.client() as client:
        upload(client, model_files["mlp"], "m", progressive="false")
    for _ in range(2):  # SIGKILL the build child, twice, wherever it runs
        child = wait_until(lambda: build_children(a) + build_children(b), 30, "a build child", 0.005)[0]
        child.kill()
        wait_until(lambda c=child: gone(c), 5, "the killed child's end")
    for server in (a, b):
        with server.client() as client:
            assert wait_for_state(client, "m", 1, timeout_s=60)["state"] == "ready"
    assert (builds([a, b], "failed"), builds([a, b], "succeeded")) == (2, 1)

    # An accuracy gate that rejects the engine would reject it again: failed at once, for good.
    strict = {"precision": "fp16", "tolerance": '{"max_abs_error": 0}', "repair": "false"}
    with a.client() as client:
        upload(client, model_files["mlp"], "r", progressive="false", **strict)
        status = wait_for_state(client, "r", 1, timeout_s=60)
    assert status["state"] == "failed" and status["error"]["type"] == "accuracy_rejected"
    with b.client() as client:
        assert wait_for_state(client, "r", 1)["catalog_state"] == "failed"
    row = replicas.build_row("r")
    assert row is not None and row[0] == "failed"
    assert replicas.query("SELECT attempts FROM builds WHERE state = 'failed'") == [(1,)]
    assert builds([a, b], "failed") == 3

    # An operator asks for it again: it runs again (and, its gate unchanged, fails again).
    retried = kiln("catalog", "retry", "r", "--catalog-url", replicas.catalog_url)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout) == {"name": "r", "retried_versions": [1]}
    wait_until(lambda: builds([a, b], "failed") == 4, 60, "the build to run again")
    with a.client() as client:
        assert wait_for_state(client, "r", 1)["state"] == "failed"
        assert client.post("/engines/r/versions/1/retry").json() == {"name": "r", "retried_versions": [1]}
    wait_until(lambda: builds([a, b], "failed") == 5, 60, "the build to run once more")


def test_a_rollout_whose_load_fails_on_one_replica_leaves_it_serving_the_old_version(
    replicas: Replicas, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """With one version kept per engine, B cannot load v2 (out of memory there): v1,
    which B still answers with, is not pruned; nothing answers 409."""
    env = {"KILN_MAX_VERSIONS_PER_ENGINE": "1", "MALLOC_ARENA_MAX": "2"}
    a, b = replicas.start(**env), replicas.start(**env)
    with a.client() as client:
        upload(client, model_files["mlp"], "m", progressive="false")
    for server in (a, b):
        wait_until(lambda s=server: outputs(s, "m") is not None, 30, "v1 served")
    assert b.process is not None
    # B's address space ends a little above what it uses now: v2's 64 instances, one
    # thread each with an 8 MiB stack, do not fit (what a GPU out of memory does).
    headroom = 192 * 1024**2
    limit = _address_space(b.process.pid) + headroom
    resource.prlimit(b.process.pid, resource.RLIMIT_AS, (limit, limit))
    with a.client() as client:
        upload(client, mlp(tmp_path / "v2.onnx", seed=3), "m", progressive="false", instances="64")
        assert wait_for_state(client, "m", 2)["state"] == "ready"
    with b.client() as client:
        assert wait_for_state(client, "m", 2, timeout_s=30)["state"] == "failed"
    # v1 stays, and each replica answers: A with v2, B with v1.
    for _ in range(3):  # several passes later
        time.sleep(float(RESYNC_S))
        assert predict(a, "m").json()["version"] == 2
        answer = predict(b, "m")
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 1
    with a.client() as client:
        status = client.get("/engines/m").json()
    assert [v["version"] for v in status["versions"]] == [1, 2]
    assert {row["state"] for row in status["replica_states"]} == {"ready", "failed"}
    failure = next(row for row in status["replica_states"] if row["state"] == "failed")
    assert failure["attempts"] >= 1 and failure["error"]["type"] == "internal"


def _address_space(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_a_terminated_listen_connection_is_restored_without_waiting_for_the_resync(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    slow = {"KILN_CATALOG_RESYNC_S": "60", "KILN_CATALOG_LEASE_TTL_S": "180"}
    a, b = replicas.start(**slow), replicas.start(**slow)
    replicas.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")
    with a.client() as client:
        upload(client, model_files["mlp"], "m")
        assert wait_for_state(client, "m")["state"] == "ready"
    ready_at = time.monotonic()
    wait_until(lambda: outputs(b, "m") is not None, 2.0, "B serves A's upload")
    assert time.monotonic() - ready_at < 2.0


def test_a_read_only_database_is_a_503_for_every_management_write(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    a = replicas.start()
    with a.client() as client:
        upload(client, model_files["mlp"], "m")
        assert wait_for_state(client, "m")["state"] == "ready"
    database = replicas.catalog_url.rsplit("/", 1)[1]
    # A demoted primary: it answers, and refuses every write.
    sql(replicas.catalog_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    sql(
        replicas.catalog_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
        database,
    )
    try:
        with a.client() as client:
            writes = [
                lambda: client.post(
                    "/engines",
                    files={"model": ("m.onnx", model_files["mlp"].read_bytes())},
                    data={"name": "m"},
                ),
                lambda: client.delete("/engines/m/versions/1"),
                lambda: client.post("/engines/m/versions/1/retry"),
            ]
            for write in writes:
                answer = write()
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["type"] == "catalog_unavailable"
                assert answer.headers["Retry-After"]
            assert client.get("/engines/m").status_code == 200  # reads work
        assert predict(a, "m").status_code == 200
    finally:
        sql(replicas.catalog_url, f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        sql(
            replicas.catalog_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            database,
        )
    with a.client() as client:
        wait_until(lambda: client.delete("/engines/m/versions/1").status_code == 200, 10, "writes again")
    assert "unhandled error" not in a.log.read_text()


def test_an_upgrade_that_adds_an_option_field_deletes_no_engine_in_use(
    replicas: Replicas, model_files: dict[str, Path]
) -> None:
    """The versions were written by a kiln without ``repair_seconds``; the replicas that
    replace it have the field (at its default). They load the engine without building,
    and garbage collection, with no grace, keeps the engine every version uses."""
    gc = {"KILN_GC_GRACE_S": "0", "KILN_GC_INTERVAL_S": "0.2"}
    a = replicas.start()
    with a.client() as client:
        upload(client, model_files["mlp"], "m")
        assert wait_for_state(client, "m")["state"] == "ready"
    assert a.stop() == 0
    # As the older kiln stored them: its option fields only, and no digest column yet.
    replicas.query(
        "UPDATE versions SET options = options - 'repair_seconds', options_digest = NULL; "
        "UPDATE builds SET options = options - 'repair_seconds', options_digest = NULL"
    )
    (artifact,) = replicas.artifacts()
    # An engine no version uses: its removal shows a collection ran.
    orphan = replicas.store / "engines" / ("f" * 64) / f"engine-{'f' * 64}" / "engine.onnx"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"unused")
    upgraded = [replicas.start(**gc), replicas.start(**gc)]
    for server in upgraded:
        with server.client() as client:
            assert wait_for_state(client, "m")["state"] == "ready"
    wait_until(lambda: not orphan.exists(), 10, "a garbage collection")
    assert artifact.exists()
    assert builds(upgraded, "succeeded") == 0  # loaded as built: nothing rebuilt


def test_a_single_node_never_gives_a_deleted_version_number_again(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    with ServerProcess(tmp_path / "store") as server, server.client() as client:
        for number in (1, 2, 3):
            assert upload(client, model_files["mlp"], "m")["version"] == number
        assert client.delete("/engines/m/versions/3").json() == {"name": "m", "deleted_versions": [3]}
        assert upload(client, model_files["mlp"], "m")["version"] == 4
        assert client.delete("/engines/m").status_code == 200
    with ServerProcess(tmp_path / "store") as server, server.client() as client:
        assert upload(client, model_files["mlp"], "m")["version"] == 5


def test_a_replica_takes_a_build_lease_only_with_a_free_build_slot(
    replicas: Replicas, model_files: dict[str, Path], tmp_path: Path
) -> None:
    """One build slot each (KILN_BUILD_WORKERS=1): while A builds a long one, a second
    upload on A is built by B, which starts meanwhile, rather than after the first on A."""
    a = replicas.start()
    with a.client() as client:
        big = cnn(tmp_path / "big.onnx", channels=64, size=128)  # several seconds to build
        upload(client, big, "long", progressive="false", precision="auto", calibration="synthetic")
        wait_until(lambda: build_children(a), 30, "the long build", 0.005)
        upload(client, model_files["mlp"], "short", progressive="false")
    b = replicas.start()
    with b.client() as client:
        assert wait_for_state(client, "short", timeout_s=60)["state"] == "ready"
    assert build_children(a), "the long build still runs on A"
    committed = replicas.query("SELECT holder FROM builds WHERE state = 'committed'")
    assert committed == [(replica_id(b),)]
    with a.client() as client:
        assert wait_for_state(client, "short")["state"] == "ready"
        client.delete("/engines/long")  # its build is stopped
