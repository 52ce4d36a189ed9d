"""Several ``kiln serve`` processes sharing one store and one catalog, for the cluster tests."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import ServerProcess

# Short lease and resync, so that expiry and catch-up happen within a test.
LEASE_TTL_S = "2"
RESYNC_S = "0.5"
ROWS = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32).tolist()


class Replicas:
    def __init__(self, store: Path, catalog_url: str) -> None:
        self.store = store
        self.catalog_url = catalog_url
        self.started: list[ServerProcess] = []

    def start(self, **env: str) -> ServerProcess:
        settings = {
            "KILN_CATALOG_URL": self.catalog_url,
            "KILN_CATALOG_LEASE_TTL_S": LEASE_TTL_S,
            "KILN_CATALOG_RESYNC_S": RESYNC_S,
            **env,
        }
        server = ServerProcess(self.store, **settings)
        self.started.append(server)
        return server.start()

    def kill_all(self) -> None:
        for server in self.started:
            if server.process is not None and server.process.poll() is None:
                if server.process.returncode is None:
                    server.process.send_signal(signal.SIGCONT)
                server.stop(signal.SIGKILL)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.catalog_url, autocommit=True) as conn:
            cursor = conn.execute(sql.encode(), params or None)
            return cursor.fetchall() if cursor.description else []

    def build_row(self, name: str) -> tuple[str, str | None, int, dict[str, Any] | None] | None:
        """(state, holder, generation, meta) of the build of ``name``'s newest version."""
        rows = self.query(
            "SELECT b.state, b.holder, b.generation, b.meta FROM builds b JOIN versions v "
            "ON v.model_sha256 = b.model_sha256 AND v.options = b.options WHERE v.name = %s "
            "ORDER BY v.version DESC LIMIT 1",
            name,
        )
        return rows[0] if rows else None  # type: ignore[return-value]

    def artifacts(self) -> list[Path]:
        """Every build's ``engine-<hash>`` directory in the store."""
        return sorted((self.store / "engines").glob("*/engine-*"))


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def predict(server: ServerProcess, name: str, version: int | None = None) -> httpx.Response:
    body: dict[str, Any] = {"engine": name, "inputs": ROWS}
    if version is not None:
        body["version"] = version
    return httpx.post(f"{server.url}/predict", json=body, timeout=10)


def outputs(server: ServerProcess, name: str, version: int | None = None) -> Any:
    response = predict(server, name, version)
    return response.json()["outputs"] if response.status_code == 200 else None


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def replica_id(server: ServerProcess) -> str:
    """The replica id a server logged at start-up."""
    for line in server.log.read_text().splitlines():
        if "cluster mode: replica " in line:
            return line.split("cluster mode: replica ", 1)[1].split(",", 1)[0]
    raise AssertionError(f"no replica id in {server.log}")
