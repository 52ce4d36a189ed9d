"""The lifecycle through a real ``kiln serve`` process: readiness after a restart
that must rebuild, and SIGTERM under ``hey -c 16`` load."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.common import hey_command
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.slow

ROWS = [[0.25] * 16, [-0.5] * 16]


def test_readiness_waits_until_restored_engines_serve(tmp_path: Path, model_files: dict[str, Path]) -> None:
    store = tmp_path / "store"
    with ServerProcess(store) as server, server.client() as client:
        # Without a baseline engine, which would serve while the engine is rebuilt.
        upload(client, model_files["mlp"], "mlp", progressive="false")
        assert wait_for_state(client, "mlp")["state"] == "ready"
    # As after a GPU or backend change: the engine must be rebuilt before it can serve.
    for engine in (store / "engines").iterdir():
        shutil.rmtree(engine)

    server = ServerProcess(store).start(wait_for="/health/live")
    try:
        answers: list[tuple[str, int, str]] = []  # (what, status, detail) in time order
        ready_at = None
        deadline = time.monotonic() + 120
        with server.client() as client:
            while time.monotonic() < deadline:
                ready = client.get("/health/ready")
                v2_ready = client.get("/v2/health/ready").status_code
                model_ready = client.get("/v2/models/mlp/ready").status_code
                predict = client.post("/predict", json={"engine": "mlp", "inputs": ROWS})
                answers.append(("ready", ready.status_code, ready.json().get("reason", "")))
                answers.append(("predict", predict.status_code, ""))
                if ready_at is None:
                    # Readiness only turns on here, so v2 readiness and model readiness,
                    # asked after a 200, must say ready too (before it they may lead).
                    if ready.status_code == 200:
                        ready_at = len(answers)
                        assert v2_ready == 200
                        assert model_ready == 200
                elif len(answers) > ready_at + 40:
                    break
        assert ready_at is not None, answers[-4:]
        waiting = [detail for what, status, detail in answers[:ready_at] if what == "ready" and status == 503]
        assert waiting, "readiness was never 503 while the engine was rebuilt"
        assert "loading 1 restored engine version(s): mlp v1" in waiting[-1]
        after = [status for what, status, _ in answers[ready_at:] if what == "predict"]
        assert after and set(after) == {200}, after
        print(f"readiness: {len(waiting)} x 503 before the restored engine served, then {len(after)} x 200")
    finally:
        assert server.stop() == 0


def test_require_ready_holds_readiness_until_the_engine_serves(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    server = ServerProcess(tmp_path / "store", KILN_REQUIRE_READY="mlp").start(wait_for="/health/live")
    try:
        with server.client() as client:
            response = client.get("/health/ready")
            assert response.status_code == 503
            assert response.json()["reason"] == "engine 'mlp' (KILN_REQUIRE_READY) does not exist"
            upload(client, model_files["mlp"], "mlp")
            assert wait_for_state(client, "mlp")["state"] == "ready"
            assert client.get("/health/ready").status_code == 200
    finally:
        assert server.stop() == 0


# -- SIGTERM under load --------------------------------------------------------------


def hey_counts(output: str) -> tuple[dict[str, int], dict[str, int]]:
    """Status code counts and error counts from hey's summary."""
    codes = {code: int(count) for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    errors: dict[str, int] = {}
    if "Error distribution:" in output:
        for count, message in re.findall(r"\[(\d+)\]\s+(.+)", output.split("Error distribution:", 1)[1]):
            errors[message.strip()] = int(count)
    return codes, errors


@pytest.mark.skipif(
    shutil.which("hey") is None, reason="needs hey (Debian package 'hey'; `make test` installs it)"
)
def test_sigterm_under_hey_load_answers_every_request(tmp_path: Path, model_files: dict[str, Path]) -> None:
    """hey -z 4s -c 16 against /predict, SIGTERM after 1.5 s, five times: every
    request gets 200 or 503, none an EOF or a reset, and the server exits 0."""
    store = tmp_path / "store"
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"engine": "mlp", "inputs": ROWS}))
    runs = []
    for run in range(5):
        server = ServerProcess(store, KILN_DRAIN_TIMEOUT_S="20").start()
        if run == 0:
            with server.client() as client:
                upload(client, model_files["mlp"], "mlp")
                assert wait_for_state(client, "mlp")["state"] == "ready"
        assert server.process is not None
        load = subprocess.Popen(
            hey_command(f"{server.url}/predict", body, seconds=4, concurrency=16, timeout_s=10),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Event().wait(1.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        output, _ = load.communicate(timeout=60)
        rc = server.process.wait(30)
        codes, errors = hey_counts(output)
        runs.append(
            {"exit": rc, "after_s": round(time.monotonic() - signalled, 2), "codes": codes, "errors": errors}
        )
        print(f"run {run + 1}: {runs[-1]}")
        assert rc == 0, server.log.read_text()[-3000:]
        assert codes.get("200", 0) > 0 and codes.get("503", 0) > 0, output
        assert set(codes) <= {"200", "503"}, output
        assert errors == {}, output
    # The server is gone after the last run: its port refuses, it does not hang.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health/live", timeout=2)
