"""INT8 vs FP32 served through kiln, side by side in one run: a conv model big
enough for INT8 kernels to pay on this CPU, both engines in one server, KServe v2
binary requests driven by hey, alternating runs.

    .venv/bin/python -m benchmarks.int8_served [--runs 3] [--seconds 8] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import hey, median, start_kiln, upload
from benchmarks.int8_models import conv_net
from service.cli.bench import build_request

SHAPE = (1, 3, 64, 64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-int8-"))
    model = conv_net(work / "convnet.onnx")
    rng = np.random.default_rng(0)
    calibration = work / "calibration.npz"
    buffer = io.BytesIO()
    np.savez(buffer, image=rng.standard_normal((64, *SHAPE[1:])).astype(np.float32))
    calibration.write_bytes(buffer.getvalue())
    image = rng.standard_normal(SHAPE).astype(np.float32)
    _, payload, v2_headers = build_request("v2-binary", "image-model", None, {"image": image})
    body = work / "body.bin"
    body.write_bytes(payload)

    server = start_kiln(work / "store")
    reports = {}
    results: dict[str, list[dict[str, float]]] = {"fp32": [], "int8": []}
    try:
        reports["fp32"] = upload(server, model, "fp32", max_batch_size=8)["report"]
        import httpx

        with httpx.Client(base_url=server.url, timeout=600) as client:
            response = client.post(
                "/engines",
                files={
                    "model": (model.name, model.read_bytes()),
                    "calibration": ("c.npz", calibration.read_bytes()),
                },
                data={"name": "int8", "precision": "int8", "max_batch_size": "8"},
            )
            response.raise_for_status()
        from benchmarks.common import wait_ready

        reports["int8"] = wait_ready(server, "int8")["report"]
        for _ in range(args.runs):
            for name in ("fp32", "int8"):
                results[name].append(
                    hey(
                        f"{server.url}/v2/models/{name}/infer",
                        body,
                        seconds=args.seconds,
                        concurrency=args.concurrency,
                        headers=v2_headers,
                        content_type="application/octet-stream",
                    )
                )
    finally:
        server.stop()
    print(
        f"conv net 3x64x64 (channels 64-64-128-128), INT8 vs FP32 in one kiln server, KServe v2 binary, "
        f"hey -c {args.concurrency} -z {args.seconds}s, {args.runs} alternating runs, medians"
    )
    print(
        f"{'engine':<6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'build-report latency ms (batch 1 / 8)':>40}"
    )
    for name, runs in results.items():
        latency = reports[name]["latency_ms"]
        print(
            f"{name:<6} {median([r['rps'] for r in runs]):>7.1f} {median([r['p50_ms'] for r in runs]):>7.2f} "
            f"{median([r['p99_ms'] for r in runs]):>7.2f} {latency['1']:>19.2f} / {latency['8']:.2f}"
        )
    speedup = median([r["rps"] for r in results["int8"]]) / median([r["rps"] for r in results["fp32"]])
    print(f"served throughput INT8 / FP32: {speedup:.2f}x")
    accuracy = reports["int8"].get("accuracy", {})
    print("INT8 accuracy vs FP32 (validation):", json.dumps(accuracy)[:300])


if __name__ == "__main__":
    main()
