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

from benchmarks.common import alternating_v2_runs, print_int8_vs_fp32, start_kiln, upload, wait_ready
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
        reports["int8"] = wait_ready(server, "int8")["report"]
        results = alternating_v2_runs(
            server,
            ("fp32", "int8"),
            body,
            v2_headers,
            runs=args.runs,
            seconds=args.seconds,
            concurrency=args.concurrency,
        )
    finally:
        server.stop()
    print(
        f"conv net 3x64x64 (channels 64-64-128-128), INT8 vs FP32 in one kiln server, KServe v2 binary, "
        f"hey -c {args.concurrency} -z {args.seconds}s, {args.runs} alternating runs, medians"
    )
    print_int8_vs_fp32(results, reports, 8)
    accuracy = reports["int8"].get("accuracy", {})
    print("INT8 accuracy vs FP32 (validation):", json.dumps(accuracy)[:300])


if __name__ == "__main__":
    main()
