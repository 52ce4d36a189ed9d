"""Protocols side by side in one run, on one kiln server.

1. HTTP with hey (`-c 16`), tiny MLP (16 -> 4): `POST /predict` (native JSON) vs
   KServe v2 infer as JSON and as binary tensors, alternating runs.
2. gRPC vs HTTP binary with the same Python client over both (tritonclient's
   asyncio clients, `--clients` concurrent callers; no native gRPC load
   generator installs here): the tiny MLP and a conv net on 3x224x224 inputs.
   With ``--pytriton-python``, Triton (the server the ``nvidia-pytriton`` wheel
   bundles, ``benchmarks/pytriton_mlp.py``) serves the same MLP beside kiln in
   sections 1 and 2.
3. Tracing off vs on (hey, v2 binary, tiny MLP): a second server exports every
   span over OTLP/gRPC to a sink in this process; and what the off-hooks cost
   per request, timed in-process.

    .venv/bin/python -m benchmarks.protocols [--runs 2] [--seconds 8] [--pytriton-python PY]

Needs `hey` (Debian package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
import time
import timeit
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks.common import Server, free_port, hey, median, start_kiln, upload, wait_http
from benchmarks.int8_models import conv_net
from service.cli.bench import build_request
from tests.models import mlp

IMAGE = (1, 3, 224, 224)


Case = tuple[Server, str, Path, dict[str, str]]
"""A server, the path to POST to, the body file and extra headers."""


def tree_cpu_seconds(server: Server) -> float:
    """CPU time of the server process and its children (Triton runs its server
    and Python backend stubs as child processes)."""
    process = psutil.Process(server.process.pid)
    total = 0.0
    for each in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = each.cpu_times()
            total += times.user + times.system
    return total


def hey_runs(cases: dict[str, Case], runs: int, seconds: float) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, (server, path, body, headers) in cases.items():
            cpu_before = tree_cpu_seconds(server)
            run = hey(f"{server.url}{path}", body, seconds=seconds, concurrency=16, headers=headers)
            run["cpu_us"] = (tree_cpu_seconds(server) - cpu_before) / max(run["ok"], 1) * 1e6
            results[name].append(run)
    return results


def print_table(title: str, results: dict[str, list[dict[str, float]]], reference: str) -> None:
    print(f"\n{title}")
    columns = ("req/s", 8), ("p50 ms", 7), ("p99 ms", 7), ("CPU us/req", 10), ("errors", 6), ("vs ref", 7)
    print(f"{'case':<28} " + " ".join(f"{name:>{width}}" for name, width in columns))
    ref = median([r["rps"] for r in results[reference]])
    for name, runs in results.items():
        rps = median([r["rps"] for r in runs])
        p50 = median([r["p50_ms"] for r in runs])
        p99 = median([r["p99_ms"] for r in runs])
        cpu = median([r.get("cpu_us", float("nan")) for r in runs])
        errors = sum(r["errors"] for r in runs)
        print(
            f"{name:<28} {rps:>8.0f} {p50:>7.2f} {p99:>7.2f} {cpu:>10.0f} {errors:>6.0f} {rps / ref:>6.2f}x"
        )


def write_body(
    server: Server, work: Path, name: str, protocol: str, engine: str, feeds: dict[str, np.ndarray]
) -> Case:
    path, body, headers = build_request(protocol, engine, None, feeds)
    file = work / f"{name}.body"
    file.write_bytes(body)
    return server, path, file, {k: v for k, v in headers.items() if k != "content-type"}


def start_pytriton(python: str, model: Path) -> tuple[Server, int]:
    """``benchmarks/pytriton_mlp.py`` under PyTriton's own Python; (server, gRPC port)."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    script = Path(__file__).with_name("pytriton_mlp.py")
    process = subprocess.Popen(
        [python, str(script), str(model), str(http_port), str(grpc_port), str(metrics_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(process, f"http://127.0.0.1:{http_port}")
    wait_http(f"{server.url}/v2/models/tiny/ready", timeout_s=120)
    return server, grpc_port


async def client_run(
    protocol: str, address: str, engine: str, array: np.ndarray, clients: int, seconds: float
) -> dict[str, float]:
    """Requests per second and latency percentiles of ``clients`` concurrent callers
    of tritonclient's asyncio client (binary tensors on HTTP, raw contents on gRPC)."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as triton_grpc

        client: Any = triton_grpc.InferenceServerClient(address)
        tensor: Any = triton_grpc.InferInput("x" if array.ndim == 2 else "image", list(array.shape), "FP32")
    else:
        import tritonclient.http.aio as triton_http

        client = triton_http.InferenceServerClient(address, conn_limit=clients)
        tensor = triton_http.InferInput("x" if array.ndim == 2 else "image", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await client.infer(engine, [tensor])
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    await client.close()
    ordered = sorted(latencies) or [float("nan")]
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "errors": float(errors),
        "ok": float(len(latencies)),
    }


class _TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: Any, context: Any) -> Any:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def off_hook_cost_ns() -> float:
    """What tracing's hooks cost one request while tracing is off (ns): the request
    span, the decode and encode spans, the queued request's context, and the
    batch check."""
    from service import tracing

    assert not tracing.enabled()

    def hooks() -> None:
        with tracing.request_span("/predict", lambda name: None):
            with tracing.span("decode"):
                pass
            tracing.current_context()
            tracing.enabled()
            with tracing.span("encode"):
                pass

    number = 200_000
    return min(timeit.repeat(hooks, number=number, repeat=5)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sections", default="http,grpc,tracing", help="which of http, grpc, tracing to run")
    parser.add_argument(
        "--pytriton-python", help="Python of a PyTriton venv: runs Triton beside kiln (pytriton_mlp.py)"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    work = Path(tempfile.mkdtemp(prefix="kiln-protocols-"))
    row = np.array([[0.1 * i for i in range(16)]], np.float32)
    image = np.random.default_rng(0).standard_normal(IMAGE).astype(np.float32)

    grpc_port = free_port()
    server = start_kiln(work / "store", {"KILN_GRPC_PORT": str(grpc_port)})
    sink = _TraceSink()
    sink_server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, sink_server)
    sink_port = sink_server.add_insecure_port("127.0.0.1:0")
    sink_server.start()
    traced = start_kiln(
        work / "store-traced",
        {
            "KILN_GRPC_PORT": "0",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        },
    )
    triton: Server | None = None
    try:
        upload(server, mlp(work / "tiny.onnx", 16, 32, 4), "tiny", max_batch_size=8)
        upload(traced, work / "tiny.onnx", "tiny", max_batch_size=8)
        upload(server, conv_net(work / "convnet.onnx", image_size=224, channels=(16, 32, 32, 64)), "convnet")
        if args.pytriton_python:
            triton, triton_grpc_port = start_pytriton(args.pytriton_python, work / "tiny.onnx")

        feeds = {"x": row}
        http_cases = {
            "/predict (native JSON)": write_body(server, work, "native", "native", "tiny", feeds),
            "v2 JSON": write_body(server, work, "v2json", "v2-json", "tiny", feeds),
            "v2 binary": write_body(server, work, "v2bin", "v2-binary", "tiny", feeds),
        }
        if triton is not None:
            http_cases["Triton v2 JSON"] = write_body(triton, work, "tjson", "v2-json", "tiny", feeds)
            http_cases["Triton v2 binary"] = write_body(triton, work, "tbin", "v2-binary", "tiny", feeds)
        print(f"tiny MLP 16->32->4, max batch 8, hey -z {args.seconds}s -c 16, {args.runs} runs (medians)")
        if "http" in sections:
            print_table(
                "HTTP endpoints", hey_runs(http_cases, args.runs, args.seconds), "/predict (native JSON)"
            )

        http_address = server.url.removeprefix("http://")
        grpc_address = f"127.0.0.1:{grpc_port}"
        client_results: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.runs if "grpc" in sections else 0):
            targets = [
                ("tiny", row, args.clients, "HTTP binary", http_address),
                ("tiny", row, args.clients, "gRPC", grpc_address),
                ("convnet", image, 4, "HTTP binary", http_address),
                ("convnet", image, 4, "gRPC", grpc_address),
            ]
            if triton is not None:
                targets += [
                    ("tiny", row, args.clients, "Triton HTTP binary", triton.url.removeprefix("http://")),
                    ("tiny", row, args.clients, "Triton gRPC", f"127.0.0.1:{triton_grpc_port}"),
                ]
            for engine, array, clients, protocol, address in targets:
                name = f"{engine} {protocol} (c={clients})"
                kind = "grpc" if protocol.endswith("gRPC") else "http"
                run = asyncio.run(client_run(kind, address, engine, array, clients, args.seconds))
                client_results.setdefault(name, []).append(run)
        if client_results:
            print_table(
                "gRPC vs HTTP, same Python client (tritonclient asyncio)",
                client_results,
                f"tiny HTTP binary (c={args.clients})",
            )

        _, path, body, headers = http_cases["v2 binary"]
        tracing_results: dict[str, list[dict[str, float]]] = {"tracing off": [], "tracing on (OTLP)": []}
        if "tracing" in sections:
            for _ in range(args.runs):
                for name, target in (("tracing off", server), ("tracing on (OTLP)", traced)):
                    case = {name: (target, path, body, headers)}
                    tracing_results[name] += hey_runs(case, 1, args.seconds)[name]
            print_table("Tracing, v2 binary", tracing_results, "tracing off")
            print(f"spans received by the OTLP sink: {sink.spans}")
            print(f"tracing hooks while off: {off_hook_cost_ns():.0f} ns per request")
    finally:
        server.stop()
        traced.stop()
        if triton is not None:
            triton.stop()
        sink_server.stop(None)


if __name__ == "__main__":
    main()
