"""Image-sized inputs (float32 3x224x224) through KServe v2, sent as JSON and as
binary tensors, side by side in one run, next to the same runner called in-process
at the batch size the server formed (the limit for a compute-bound model).

    .venv/bin/python -m benchmarks.image_payloads [--runs 2] [--seconds 10] [--concurrency 4]

Needs `hey` (Debian package).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.batching import mean_batch_size
from benchmarks.common import hey, in_process_rows_per_second, median, start_kiln, upload
from benchmarks.int8_models import conv_net
from service.cli.bench import build_request

SHAPE = (1, 3, 224, 224)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-images-"))
    model = conv_net(work / "convnet224.onnx", image_size=224, channels=(16, 32, 32, 64))
    image = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    json_body = work / "json.body"
    json_body.write_text(
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": list(SHAPE),
                        "datatype": "FP32",
                        "data": image.ravel().tolist(),
                    }
                ]
            }
        )
    )
    _, payload, v2_headers = build_request("v2-binary", "image-model", None, {"image": image})
    binary_body = work / "binary.body"
    binary_body.write_bytes(payload)

    server = start_kiln(work / "store")
    results: dict[str, list[dict[str, float]]] = {"JSON": [], "binary": []}
    try:
        upload(server, model, "convnet", max_batch_size=4)
        url = f"{server.url}/v2/models/convnet/infer"
        for _ in range(args.runs):
            results["JSON"].append(hey(url, json_body, seconds=args.seconds, concurrency=args.concurrency))
            results["binary"].append(
                hey(
                    url,
                    binary_body,
                    seconds=args.seconds,
                    concurrency=args.concurrency,
                    headers=v2_headers,
                    content_type="application/octet-stream",
                )
            )
        batch = mean_batch_size(httpx.get(f"{server.url}/metrics").text, "convnet")
    finally:
        server.stop()
    limit_batch = max(1, round(batch))
    limit = in_process_rows_per_second(model, "image", SHAPE[1:], limit_batch, seconds=5.0)
    print(
        f"conv net on float32 {SHAPE[1:]} ({json_body.stat().st_size / 1e6:.1f} MB as JSON, "
        f"{binary_body.stat().st_size / 1e6:.1f} MB binary), KServe v2 infer, "
        f"hey -c {args.concurrency} -z {args.seconds}s, {args.runs} runs, medians"
    )
    print(f"{'encoding':<10} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, runs in results.items():
        print(
            f"{name:<10} {median([r['rps'] for r in runs]):>7.1f} "
            f"{median([r['p50_ms'] for r in runs]):>8.1f} {median([r['p99_ms'] for r in runs]):>8.1f} "
            f"{sum(r['errors'] for r in runs):>6.0f}"
        )
    binary_rps = median([r["rps"] for r in results["binary"]])
    json_rps = median([r["rps"] for r in results["JSON"]])
    print(f"binary / JSON throughput: {binary_rps / json_rps:.2f}x; mean served batch {batch:.2f}")
    print(f"in-process runner at batch {limit_batch}: {limit:.1f} images/s")
    print(f"served (binary) / in-process: {binary_rps / limit:.2f}x")


if __name__ == "__main__":
    main()
