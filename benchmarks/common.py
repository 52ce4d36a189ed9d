"""Helpers shared by the serving benchmarks: start servers, drive hey, parse its output."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process and its threads so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_kiln(
    store: Path, env: dict[str, str] | None = None, *, cpu: int | None = None, source: Path | None = None
) -> Server:
    """``kiln serve`` on a free port; ``cpu`` pins it to one core (``taskset``), and
    ``source`` runs the ``service`` package of another source tree (an exported
    commit, to compare against) with this environment's libraries."""
    port = free_port()
    command = [str(VENV_BIN / "kiln"), "serve", "--port", str(port), "--store", str(store)]
    if source is not None:
        command = [sys.executable, "-c", "from service.cli.main import main; main()", *command[1:]]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    process = subprocess.Popen(
        command,
        env={**os.environ, "KILN_BACKEND": "onnxruntime", "KILN_LOG_LEVEL": "warning", **(env or {})},
        cwd=source,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(process, f"http://127.0.0.1:{port}")
    wait_http(f"{server.url}/health/ready")
    return server


def upload(server: Server, model: Path, name: str, **fields: Any) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post(
            "/engines",
            files={"model": (model.name, model.read_bytes())},
            data={"name": name, **{k: str(v) for k, v in fields.items()}},
        )
        response.raise_for_status()
    return wait_ready(server, name)


def wait_ready(server: Server, name: str, timeout_s: float = 600) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = client.get(f"/engines/{name}").json()
            if status["state"] in ("ready", "fallback", "failed"):
                if status["state"] == "failed":
                    raise RuntimeError(f"build of {name} failed: {status['error']}")
                return dict(status)
            time.sleep(0.2)
    raise RuntimeError(f"{name} was not ready in time")


def start_python_app(script: Path, *args: str) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(script), *args, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Server(process, f"http://127.0.0.1:{port}")


def hey_command(
    url: str,
    body_file: Path,
    *,
    seconds: float,
    concurrency: int,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
    timeout_s: int | None = None,
) -> list[str]:
    """The hey command line for POSTing ``body_file`` to ``url``."""
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST"]
    if timeout_s is not None:
        command += ["-t", str(timeout_s)]
    command += ["-T", content_type, "-D", str(body_file)]
    for key, value in (headers or {}).items():
        command += ["-H", f"{key}: {value}"]
    return [*command, url]


def hey(
    url: str,
    body_file: Path,
    *,
    seconds: float,
    concurrency: int,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> dict[str, float]:
    """Run hey against ``url``; returns req/s, p50/p90/p99 in ms and non-200 count."""
    command = hey_command(
        url, body_file, seconds=seconds, concurrency=concurrency, headers=headers, content_type=content_type
    )
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        match = re.search(rf"{pct}% in ([\d.]+) secs", output)
        result[f"p{pct}_ms"] = float(match.group(1)) * 1000 if match else float("nan")
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", output))
    result["ok"] = float(codes.get("200", 0))
    result["errors"] = float(sum(int(v) for k, v in codes.items() if k != "200"))
    return result


def alternating_v2_runs(
    server: Server,
    names: tuple[str, ...],
    body_file: Path,
    headers: dict[str, str],
    *,
    runs: int,
    seconds: float,
    concurrency: int,
) -> dict[str, list[dict[str, float]]]:
    """hey runs of a KServe v2 binary body against each model in ``names``, alternating, ``runs`` rounds."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            results[name].append(
                hey(
                    f"{server.url}/v2/models/{name}/infer",
                    body_file,
                    seconds=seconds,
                    concurrency=concurrency,
                    headers=headers,
                    content_type="application/octet-stream",
                )
            )
    return results


def print_int8_vs_fp32(
    results: dict[str, list[dict[str, float]]], reports: dict[str, dict[str, Any]], batch: int
) -> None:
    """Median served req/s and latencies per engine beside its build report's latency at 1 and ``batch``,
    then the INT8 / FP32 throughput ratio."""
    header = f"{'engine':<6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}"
    print(f"{header} {f'build-report latency ms (batch 1 / {batch})':>40}")
    for name, runs in results.items():
        latency = reports[name]["latency_ms"]
        print(
            f"{name:<6} {median([r['rps'] for r in runs]):>7.1f} {median([r['p50_ms'] for r in runs]):>7.2f} "
            f"{median([r['p99_ms'] for r in runs]):>7.2f} {latency['1']:>19.2f} / {latency[str(batch)]:.2f}"
        )
    speedup = median([r["rps"] for r in results["int8"]]) / median([r["rps"] for r in results["fp32"]])
    print(f"served throughput INT8 / FP32: {speedup:.2f}x")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def in_process_rows_per_second(
    model: Path, input_name: str, row_shape: tuple[int, ...], batch: int, seconds: float = 3.0
) -> float:
    """Rows per second of kiln's ONNX Runtime runner called directly at ``batch``
    (the limit a server can approach), with the server's default thread settings."""
    import numpy as np

    from engines.backends.onnxruntime import OnnxRuntimeBackend
    from engines.onnx_model import load_model, read_signature
    from engines.types import BuildOptions

    signature = read_signature(load_model(model))
    runner = OnnxRuntimeBackend().load(model, signature, BuildOptions(max_batch_size=max(batch, 1)))
    feeds = {input_name: np.random.default_rng(0).standard_normal((batch, *row_shape)).astype(np.float32)}
    for _ in range(3):
        runner.infer(feeds)
    runs = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner.infer(feeds)
        runs += 1
    rate = runs * batch / (time.perf_counter() - started)
    runner.close()
    return rate
