"""Faults against a real server process: SIGKILL in the middle of an upload, a
build and a store write; a corrupted artifact; SIGTERM under load and during a
build. After each restart on the same store, what was ready is served with
identical outputs and nothing partial is visible."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.store import EngineStore
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess, build_children, gone
from tests.e2e.test_server import sample_value

pytestmark = pytest.mark.slow

ROWS = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32).tolist()


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Servers a test starts; every one still running is killed at the end."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            if server.process is not None and server.process.poll() is None:
                server.stop(signal.SIGKILL)


def start(servers: list[ServerProcess], store: Path, **env: str) -> ServerProcess:
    server = ServerProcess(store, **env)
    servers.append(server)
    return server.start()


def predict(client: httpx.Client, engine: str = "keep") -> dict[str, Any]:
    response = client.post("/predict", json={"engine": engine, "inputs": ROWS})
    assert response.status_code == 200, response.text
    return dict(response.json())


def serve_keep(
    servers: list[ServerProcess], store: Path, model: Path
) -> tuple[ServerProcess, dict[str, Any]]:
    """A server with one ready engine 'keep' and its outputs for ``ROWS``."""
    server = start(servers, store)
    with server.client() as client:
        upload(client, model, "keep")
        assert wait_for_state(client, "keep")["state"] == "ready"
        return server, predict(client)


def leftovers(store: Path) -> set[Path]:
    """What a kill may leave: temp files, and engine directories never committed."""
    return set((store / "tmp").iterdir()) | {
        d for d in (store / "engines").iterdir() if not (d / "meta.json").exists()
    }


def assert_store_is_clean(store: Path, left: set[Path] | None = None) -> None:
    """No temp files, and every engine directory holds a committed, verified engine;
    with ``left`` (what a kill left): none of that is there any more (a build the
    restart resumed may be writing its own files meanwhile)."""
    if left is not None:
        assert leftovers(store) & left == set()
        return
    assert list((store / "tmp").iterdir()) == []
    engines = EngineStore(store)
    for directory in (store / "engines").iterdir():
        assert (directory / "meta.json").exists(), f"uncommitted engine dir {directory.name}"
        assert engines.verify_engine(directory.name) is not None


def assert_keep_is_served_as_before(server: ServerProcess, before: dict[str, Any]) -> None:
    with server.client() as client:
        assert wait_for_state(client, "keep")["state"] == "ready"
        assert predict(client) == before


# -- SIGKILL ---------------------------------------------------------------------------


class SlowUpload(threading.Thread):
    """Streams a large multipart upload over a raw socket, a chunk at a time,
    until told to stop or the server goes away (bounded in size and time)."""

    CHUNK = 64 * 1024
    CHUNKS = 1024  # a 64 MiB model, of which only the start is ever sent

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.name_field = name
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        boundary = "slowslowslow"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{self.name_field}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="big.onnx"\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = len(head) + self.CHUNK * self.CHUNKS + len(tail)
        request = (
            f"POST /engines HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
        deadline = time.monotonic() + 60
        try:
            with socket.create_connection((self.host, self.port), timeout=5) as sock:
                sock.sendall(request + head)
                for _ in range(self.CHUNKS):
                    if self.stop.is_set() or time.monotonic() > deadline:
                        return
                    sock.sendall(b"\x07" * self.CHUNK)
                    self.sent += self.CHUNK
                    time.sleep(0.01)
        except OSError:
            return  # the server was killed: expected


def partial_upload_bytes(store: Path) -> int:
    total = 0
    for path in (store / "tmp").glob("*.upload"):
        with contextlib.suppress(FileNotFoundError):  # published or removed meanwhile
            total += path.stat().st_size
    return total


def test_sigkill_during_an_upload(
    tmp_path: Path, model_files: dict[str, Path], servers: list[ServerProcess]
) -> None:
    store = tmp_path / "store"
    server, before = serve_keep(servers, store, model_files["mlp"])
    sender = SlowUpload(server.url, "victim")
    sender.start()
    try:
        # Kill once a good part of the upload sits in the store's temp directory.
        wait_until(lambda: partial_upload_bytes(store) > 512 * 1024, 20, "a partial upload in store/tmp")
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        sender.stop.set()
        sender.join(10)
    assert list((store / "tmp").iterdir()), "the kill should have left a partial upload behind"

    restarted = start(servers, store)
    assert_store_is_clean(store)
    assert_keep_is_served_as_before(restarted, before)
    with restarted.client() as client:
        assert client.get("/engines/victim").status_code == 404
        assert [e["name"] for e in client.get("/engines").json()["engines"]] == ["keep"]


def test_sigkill_during_a_build(
    tmp_path: Path, model_files: dict[str, Path], servers: list[ServerProcess]
) -> None:
    store = tmp_path / "store"
    server, before = serve_keep(servers, store, model_files["mlp"])
    with server.client() as client:
        # Without a baseline engine: the version is building, unservable, when the server dies.
        upload(client, model_files["cnn"], "victim", progressive="false")
        children = wait_until(lambda: build_children(server), 30, "a build child process", 0.005)
        assert client.get("/engines/victim").json()["state"] == "building"
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    # The orphaned build notices its server is gone and stops writing to the store.
    for child in children:
        wait_until(lambda child=child: gone(child), 15, f"exit of the orphaned build {child.pid}")

    left = leftovers(store)
    restarted = start(servers, store)
    assert_store_is_clean(store, left)
    assert_keep_is_served_as_before(restarted, before)
    with restarted.client() as client:
        # Nothing is lost: the interrupted build runs again, and the version serves.
        assert wait_for_state(client, "victim", 1)["state"] == "ready"
        assert client.get("/engines/victim").json()["versions"] == [
            {"name": "victim", "version": 1, "state": "ready", "url": "/engines/victim/versions/1"}
        ]


STAND_IN = """
import multiprocessing, os, time
from service.lifecycle.jobs import exit_when_orphaned


def build(parent_pid, conn):
    conn.send("started")  # imports done: the watch starts now
    exit_when_orphaned(parent_pid)


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=build, args=(os.getpid(), sender), daemon=True)
    child.start()
    if receiver.poll(60):
        receiver.recv()
        print(child.pid, flush=True)
    time.sleep(120)
"""


def test_a_build_process_outlives_its_killed_server_by_under_a_second(tmp_path: Path) -> None:
    """A build child watches its parent: killed with SIGKILL, the server cannot stop
    its builds, and a long backend phase sends nothing that would fail."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    stand_in = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2], text=True
    )
    child: psutil.Process | None = None
    try:
        assert stand_in.stdout is not None
        child = psutil.Process(int(stand_in.stdout.readline()))
        assert not gone(child)
        stand_in.kill()
        stand_in.wait(10)
        killed_at = time.monotonic()
        wait_until(lambda: gone(child), 5, "exit of the orphaned child")
        assert time.monotonic() - killed_at < 1.5
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
            stand_in.wait(10)
        if child is not None and not gone(child):
            child.kill()


def test_sigkill_during_a_store_write(
    tmp_path: Path, model_files: dict[str, Path], servers: list[ServerProcess]
) -> None:
    """What a kill leaves at each point of a write: a partial upload and a build's
    work directory in tmp/, an artifact published without its meta.json (the
    commit point), and a version recorded as building."""
    store = tmp_path / "store"
    server, before = serve_keep(servers, store, model_files["mlp"])
    with server.client() as client:
        keep_key = client.get("/engines/keep").json()["report"]["cache_key"]
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    (store / "tmp" / "tmpa1b2c3.upload").write_bytes(b"\x08" * 4096)
    (store / "tmp" / "tmpd4e5f6").write_bytes(b"{")  # a record being written
    work = store / "tmp" / "build-abc123"
    work.mkdir()
    (work / "fp32.onnx").write_bytes(model_files["cnn"].read_bytes()[:1000])
    half_key = "f" * 64
    half = store / "engines" / half_key
    half.mkdir()
    keep_artifact = json.loads((store / "engines" / keep_key / "meta.json").read_text())["artifact"]
    (half / keep_artifact).parent.mkdir()
    shutil.copyfile(store / "engines" / keep_key / keep_artifact, half / keep_artifact)
    record = json.loads((store / "records" / "keep" / "1.json").read_text())
    record.update(name="half", version=1, state="building", cache_key=half_key)
    (store / "records" / "half").mkdir()
    (store / "records" / "half" / "1.json").write_text(json.dumps(record))

    restarted = start(servers, store)
    assert not half.exists()
    assert_store_is_clean(store)
    assert_keep_is_served_as_before(restarted, before)
    with restarted.client() as client:
        # Its build is resumed; it is keep's model and options, whose engine is stored.
        assert wait_for_state(client, "half")["state"] == "ready"
        assert client.post("/predict", json={"engine": "half", "inputs": ROWS}).status_code == 200
        metrics = client.get("/metrics").text
    assert sample_value(metrics, "kiln_engine_builds_total", result="succeeded") == 0


@pytest.mark.parametrize(
    "damage", ["flip-artifact-bytes", "truncate-artifact", "delete-artifact", "garble-meta"]
)
def test_a_corrupt_engine_is_rebuilt_on_restart(
    tmp_path: Path, model_files: dict[str, Path], servers: list[ServerProcess], damage: str
) -> None:
    store = tmp_path / "store"
    server, before = serve_keep(servers, store, model_files["mlp"])
    with server.client() as client:
        key = client.get("/engines/keep").json()["report"]["cache_key"]
    assert server.stop(signal.SIGTERM) == 0
    meta = store / "engines" / key / "meta.json"
    artifact = store / "engines" / key / json.loads(meta.read_text())["artifact"]
    original_sha = json.loads(meta.read_text())["artifact_sha256"]
    data = bytearray(artifact.read_bytes())
    if damage == "flip-artifact-bytes":
        for offset in range(len(data) // 2, len(data) // 2 + 16):
            data[offset] ^= 0xFF
        artifact.write_bytes(bytes(data))
    elif damage == "truncate-artifact":
        artifact.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "delete-artifact":
        artifact.unlink()
    else:
        meta.write_text(meta.read_text()[:20])

    restarted = start(servers, store)
    assert_keep_is_served_as_before(restarted, before)
    assert_store_is_clean(store)
    assert json.loads(meta.read_text())["artifact_sha256"] == original_sha  # rebuilt the same
    with restarted.client() as client:
        metrics = client.get("/metrics").text
    assert sample_value(metrics, "kiln_engine_builds_total", result="succeeded") == 1
    assert "rebuilding it from the stored model" in restarted.log.read_text()


# -- SIGTERM ---------------------------------------------------------------------------


def slow_model(path: Path, width: int = 512, depth: int = 400) -> Path:
    """x[batch, width] -> depth x (MatMul by one shared weight, Tanh): ~25 ms per
    8 rows on one core, from a 1 MB file."""
    rng = np.random.default_rng(0)
    nodes = []
    previous = "x"
    for i in range(depth):
        output = "y" if i == depth - 1 else f"t{i}"
        nodes += [
            helper.make_node("MatMul", [previous, "w"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [output]),
        ]
        previous = output
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


@dataclass
class Outcome:
    started: float
    finished: float
    status: int | None = None
    retry_after: str | None = None
    error: str | None = None


def drive(url: str, body: bytes, stop: threading.Event, outcomes: list[Outcome], limit: int) -> None:
    """One client connection sending requests back to back until told to stop."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(limit):
            if stop.is_set():
                return
            started = time.monotonic()
            try:
                response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
                outcomes.append(
                    Outcome(
                        started, time.monotonic(), response.status_code, response.headers.get("retry-after")
                    )
                )
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(started, time.monotonic(), error=f"{type(exc).__name__}: {exc}"))
                return


def test_sigterm_under_load_answers_every_accepted_request(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    store = tmp_path / "store"
    server = start(servers, store, KILN_DRAIN_TIMEOUT_S="20", KILN_LOG_JSON="true")
    with server.client() as client:
        created = client.post(
            "/engines",
            files={"model": ("slow.onnx", slow_model(tmp_path / "slow.onnx").read_bytes())},
            data={"name": "slow", "max_batch_size": "8", "max_queue_delay_ms": "5"},
            headers={"X-Request-ID": "upload-slow-1"},
        )
        assert created.status_code == 202, created.text
        assert created.headers["x-request-id"] == "upload-slow-1"
        assert wait_for_state(client, "slow", timeout_s=120)["state"] == "ready"
    rows = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    body = json.dumps({"engine": "slow", "inputs": rows.tolist()}).encode()

    stop = threading.Event()
    outcomes: list[Outcome] = []
    workers = [
        threading.Thread(target=drive, args=(server.url, body, stop, outcomes, 2000), daemon=True)
        for _ in range(8)
    ]
    readiness: list[int] = []
    try:
        for worker in workers:
            worker.start()
        wait_until(lambda: sum(o.status == 200 for o in outcomes) >= 16, 30, "16 answered requests")
        assert server.process is not None
        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=server.url, timeout=5) as probe:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    readiness.append(probe.get("/health/ready").status_code)
                except httpx.HTTPError:
                    break  # gone
                if readiness[-1] != 200:
                    break
                time.sleep(0.01)
        # The clients go on for a second, then stop, as when a load balancer has taken
        # the pod out: the drain answers them all and ends once they are quiet.
        time.sleep(1.0)
        stop.set()
        rc = server.process.wait(60)
    finally:
        stop.set()
        for worker in workers:
            worker.join(35)
    exited_at = time.monotonic()
    assert rc == 0, server.log.read_text()[-3000:]
    assert exited_at - sigterm_at < 20

    before = [o for o in outcomes if o.started < sigterm_at]
    after = [o for o in outcomes if o.started >= sigterm_at]
    print(
        f"SIGTERM under load: {len(before)} requests sent before the signal "
        f"({sum(o.status == 200 for o in before)} answered 200, "
        f"{sum(o.status == 200 and o.finished > sigterm_at for o in before)} of them after it; "
        f"{sum(o.status == 503 for o in before)} answered 503), {len(after)} after "
        f"({sum(o.status == 503 for o in after)} answered 503, "
        f"{sum(o.status is None for o in after)} without an answer); readiness {readiness}; "
        f"exit {rc} after {exited_at - sigterm_at:.2f} s"
    )
    # Every request sent before the signal was answered: 200, or 503 if it arrived
    # once draining had begun. None was cut off.
    problems = [o for o in before if o.status not in (200, 503)]
    assert problems == [], problems[:5]
    # Queued and running requests finished during the drain.
    assert any(o.status == 200 and o.finished > sigterm_at for o in before)
    # New requests were refused with 503 and Retry-After (the signal is handled
    # within the event loop's next turn: allow 0.2 s for it); none met a closed
    # connection or listener.
    refused = [o for o in outcomes if o.status == 503]
    assert refused, "no request was refused while draining"
    # (Draining says 1 s; an overloaded engine its backlog's drain time, whole seconds.)
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    assert all(o.retry_after == "1" for o in refused if o.started > sigterm_at + 0.2)
    assert [o for o in outcomes if o.status is None] == []
    for outcome in after:
        if outcome.started > sigterm_at + 0.2:
            assert outcome.status == 503, outcome
    # Readiness turned false (503) while draining, unless the drain beat the probe.
    assert readiness[-1:] in ([], [503]) and set(readiness) <= {200, 503}

    # KILN_LOG_JSON: every line is one JSON object, uvicorn's own included; the
    # build's lines carry the id of the upload that started it.
    log = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    by_message = {line["message"]: line for line in log}
    assert by_message["engine slow v1 is ready (onnxruntime, fp32)"]["request_id"] == "upload-slow-1"
    assert "request_id" not in by_message["signal 15: draining for up to 20 s"]
    assert "kiln stopped" in by_message
    assert "Finished server process" in " ".join(by_message)


def test_sigterm_during_a_build_stops_the_child_and_exits_0(
    tmp_path: Path, model_files: dict[str, Path], servers: list[ServerProcess]
) -> None:
    store = tmp_path / "store"
    server = start(servers, store)
    with server.client() as client:
        # INT8 with calibration takes seconds, so the build is still running when
        # the drain ends (an FP32 build of this model can finish during the drain).
        upload(
            client,
            model_files["cnn"],
            "halfway",
            progressive="false",
            precision="int8",
            calibration="synthetic",
        )
        children = wait_until(lambda: build_children(server), 30, "a build child process", 0.005)
    assert server.stop(signal.SIGTERM) == 0
    for child in children:
        assert gone(child), f"build child {child.pid} outlived the server"
    left = leftovers(store)
    restarted = start(servers, store)
    assert_store_is_clean(store, left)
    with restarted.client() as client:
        # The stop interrupted the build; the start resumes it.
        assert client.get("/engines/halfway").json()["state"] == "building"
        wait_until(lambda: build_children(restarted), 30, "the build running again", 0.01)
