"""``kiln bench``: a load generator for a running kiln server.

Closed loop (``--concurrency N`` clients, each sending its next request when the
last one returns) or open loop (``--rate R`` requests per second, whatever the
latency). Reports throughput, p50/p90/p99 and the server's batch-size
distribution read from ``/metrics`` before and after. A Python client uses CPU
itself: for throughput figures on a small machine, prefer a native generator
(wrk, hey) as docs/BENCHMARKS.md does; this tool is for scenarios and checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
import numpy as np

from engines.shapes import synthetic_inputs
from engines.types import Signature


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--engine", required=True)
    parser.add_argument("--version", type=int)
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop: concurrent clients")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--protocol", choices=["native", "v2-json", "v2-binary"], default="native")
    parser.add_argument("--api-key")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _v2_datatype(dtype: np.dtype) -> str:
    names = {
        "float32": "FP32",
        "float16": "FP16",
        "float64": "FP64",
        "int64": "INT64",
        "int32": "INT32",
        "int16": "INT16",
        "int8": "INT8",
        "uint8": "UINT8",
        "bool": "BOOL",
    }
    return names[str(dtype)]


def build_request(
    protocol: str, engine: str, version: int | None, feeds: dict[str, np.ndarray]
) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one inference request."""
    if protocol == "native":
        body: dict[str, Any] = {"engine": engine, "inputs": {k: v.tolist() for k, v in feeds.items()}}
        if version is not None:
            body["version"] = version
        return "/predict", json.dumps(body).encode(), {"content-type": "application/json"}
    path = f"/v2/models/{engine}" + (f"/versions/{version}" if version else "") + "/infer"
    inputs: list[dict[str, Any]]
    if protocol == "v2-json":
        inputs = [
            {
                "name": k,
                "shape": list(v.shape),
                "datatype": _v2_datatype(v.dtype),
                "data": v.flatten().tolist(),
            }
            for k, v in feeds.items()
        ]
        return path, json.dumps({"inputs": inputs}).encode(), {"content-type": "application/json"}
    inputs = [
        {
            "name": k,
            "shape": list(v.shape),
            "datatype": _v2_datatype(v.dtype),
            "parameters": {"binary_data_size": v.nbytes},
        }
        for k, v in feeds.items()
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    body_bytes = header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
    return path, body_bytes, {"inference-header-content-length": str(len(header))}


def parse_histogram(metrics_text: str, name: str, engine: str) -> dict[str, float]:
    """Cumulative bucket counts of a histogram for one engine, from /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("engine") == engine:
                le = sample.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=60) as client:
        status = (await client.get(f"/engines/{args.engine}")).raise_for_status().json()
        signature = status["report"]["signature"]
        feeds = synthetic_inputs(Signature.from_dict(signature), None, args.rows)
        path, body, request_headers = build_request(args.protocol, args.engine, args.version, feeds)
        before = parse_histogram((await client.get("/metrics")).text, "kiln_batch_size", args.engine)
        latencies: list[float] = []
        codes: dict[int, int] = {}
        stop_at = time.perf_counter() + args.duration

        async def one() -> None:
            start = time.perf_counter()
            try:
                response = await client.post(path, content=body, headers=request_headers)
                code = response.status_code
            except httpx.HTTPError:
                code = 0
            latencies.append(time.perf_counter() - start)
            codes[code] = codes.get(code, 0) + 1

        started = time.perf_counter()
        if args.rate:
            tasks = []
            interval = 1.0 / args.rate
            next_at = started
            while next_at < stop_at:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                tasks.append(asyncio.create_task(one()))
                next_at += interval
            await asyncio.gather(*tasks)
        else:

            async def client_loop() -> None:
                while time.perf_counter() < stop_at:
                    await one()

            await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        after = parse_histogram((await client.get("/metrics")).text, "kiln_batch_size", args.engine)
    runs = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "rows_per_second": round(len(latencies) * args.rows / elapsed, 1),
        "latency_ms": {
            q: round(float(np.percentile(lat, p)), 3) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "batch_size_cumulative_runs": runs,
    }


def run_bench_cli(args: argparse.Namespace) -> int:
    result = asyncio.run(run_bench(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['requests']} requests in {result['seconds']} s: "
            f"{result['requests_per_second']} req/s, {result['rows_per_second']} rows/s"
        )
        print("latency ms: " + ", ".join(f"{k} {v}" for k, v in result["latency_ms"].items()))
        print("status codes: " + ", ".join(f"{k}: {v}" for k, v in result["status_codes"].items()))
        print(
            "batch sizes (runs with size <= le): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in result["batch_size_cumulative_runs"].items())
        )
    return 0 if all(code == "200" for code in result["status_codes"]) else 1
