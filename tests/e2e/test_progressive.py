"""Progressive engines through a real server: an INT8 upload serves on its FP32
baseline within seconds, under load, and its INT8 engine swaps in with no failed
request; a restart starts on the stored INT8 engine directly."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.server import ServerProcess
from tests.e2e.test_server import sample_value
from tests.models import reference_outputs
from tests.precision_models import CNN_INPUT, CNN_OUTPUT, small_cnn

pytestmark = pytest.mark.slow

CLIENTS = 2
UPLOAD_ID = "upload-cnn-int8"
# INT8's gate on this model (engines.accuracy defaults): mean cosine similarity.
INT8_COSINE = 0.99


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class Load:
    """``CLIENTS`` threads that predict in a loop from the moment they start,
    retrying only while the version is not servable yet (409), and record every
    answer: (time it came, status, output)."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.url = url
        self.body = body
        self.stop = threading.Event()
        self.answers: list[tuple[float, int, np.ndarray | None]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                response = client.post("/predict", json=self.body)
                output = None
                if response.status_code == 200:
                    output = np.asarray(response.json()["outputs"][CNN_OUTPUT], np.float32)
                with self._lock:
                    self.answers.append((time.time(), response.status_code, output))
                if response.status_code == 409:
                    time.sleep(0.01)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)


def watch(client: httpx.Client, name: str, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Every distinct (state, serving) the version shows until it settles."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/engines/{name}/versions/1").json()
        if not seen or (status["state"], status["serving"]) != (seen[-1]["state"], seen[-1]["serving"]):
            seen.append(status)
        if status["state"] in ("ready", "fallback", "failed"):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"{name} did not settle; seen {seen}")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Large enough that its INT8 build (synthetic calibration, gate, profile) takes seconds here.
    return small_cnn(tmp_path_factory.mktemp("progressive") / "cnn.onnx", image_size=64, channels=(32, 64))


def test_int8_upload_serves_on_the_baseline_at_once_and_swaps_without_a_failed_request(
    tmp_path: Path, cnn: Path
) -> None:
    image = np.random.default_rng(7).standard_normal((2, 1, 64, 64)).astype(np.float32)
    reference = reference_outputs(cnn, {CNN_INPUT: image})[CNN_OUTPUT]
    body = {"engine": "cnn", "inputs": {CNN_INPUT: image.tolist()}}
    store = tmp_path / "store"
    with ServerProcess(store, KILN_LOG_JSON="true") as server, server.client() as client:
        response = client.post(
            "/engines",
            files={"model": ("cnn.onnx", cnn.read_bytes())},
            data={"name": "cnn", "precision": "int8", "calibration": "synthetic"},
            headers={"X-Request-ID": UPLOAD_ID},
        )
        assert response.status_code == 202, response.text
        uploaded_at = time.time()
        with Load(server.url, body) as load:
            seen = watch(client, "cnn")
            time.sleep(0.5)  # keep the load on past the swap
        metrics = client.get("/metrics").text
        log = server.log.read_text()

    states = [(s["state"], (s["serving"] or {}).get("tier")) for s in seen]
    assert ("baseline", "baseline") in states and states[-1] == ("ready", "optimized"), states
    baseline = next(s["serving"] for s in seen if s["state"] == "baseline")
    final = seen[-1]["serving"]
    assert (baseline["backend"], baseline["precision"], baseline["provider"]) == (
        "onnxruntime",
        "fp32",
        "CPUExecutionProvider",
    )
    assert final["precision"] == "int8" and final["backend"] == "onnxruntime"

    answers = sorted(load.answers, key=lambda a: a[0])
    codes = [code for _, code, _ in answers]
    first_ok = codes.index(200)
    assert set(codes[:first_ok]) <= {409}, "before it was servable, only 409 (not ready)"
    after = codes[first_ok:]
    assert after.count(200) == len(after), f"{len(after) - after.count(200)} errors across the swap"
    first_ok_at = answers[first_ok][0]
    print(
        f"upload→baseline {baseline['since'] - uploaded_at:.2f} s, baseline→first 200 "
        f"{first_ok_at - baseline['since']:.2f} s, baseline→int8 {final['since'] - baseline['since']:.2f} s, "
        f"{len(after)} requests from the first 200 on, all 200"
    )
    # Served within 2 s of the baseline being ready, well before the INT8 engine was.
    assert first_ok_at - baseline["since"] < 2.0
    assert final["since"] - first_ok_at > 1.0, "the INT8 engine was ready about as soon as the baseline"

    # Outputs: the baseline's equal FP32; after the swap they are INT8's (no longer
    # exact) and within the gate; no answer from the baseline after the first INT8 one.
    outputs = [out for _, code, out in answers if code == 200]
    assert all(out is not None for out in outputs)
    exact = [bool(np.allclose(out, reference, rtol=1e-4, atol=1e-5)) for out in outputs]
    assert exact[0] and not exact[-1]
    switch = exact.index(False)
    assert not any(exact[switch:]), "an answer from the baseline came after one from the INT8 engine"
    assert switch >= 20, f"only {switch} answers came from the baseline before the INT8 engine's"
    assert all(cosine(out, reference) >= INT8_COSINE for out in outputs)  # type: ignore[arg-type]

    assert sample_value(metrics, "kiln_engine_serving", engine="cnn", tier="optimized", precision="int8") == 1
    assert sample_value(metrics, "kiln_engine_serving", engine="cnn", tier="baseline") == 0
    # The baseline and the swap are logged under the upload's request id.
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    for text in ("serves on its baseline engine", "swapped from its baseline engine"):
        (line,) = [line for line in lines if text in line["message"]]
        assert line["request_id"] == UPLOAD_ID, line

    # Restart on the same store: straight onto the stored INT8 engine, no baseline step.
    with ServerProcess(store) as server, server.client() as client:
        seen = watch(client, "cnn")
        assert all(s["state"] != "baseline" for s in seen), seen
        assert seen[-1]["serving"]["tier"] == "optimized" and seen[-1]["serving"]["precision"] == "int8"
        again = client.post("/predict", json=body)
        assert again.status_code == 200
        assert cosine(np.asarray(again.json()["outputs"][CNN_OUTPUT]), reference) >= INT8_COSINE
    assert "serves on its baseline engine" not in server.log.read_text()
