"""kiln vs a hand-written FastAPI app on the tiny MLP (16 -> 4) from MEASURING.md.

Both serve the same ONNX model on loopback; hey drives `-c 16` for a few seconds
per run, runs alternate, and medians are reported side by side with the server's
CPU time per request. Needs `hey` (Debian package).

    .venv/bin/python benchmarks/tiny_mlp.py [--runs 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import hey, median, start_kiln, start_python_app, upload, wait_http
from tests.models import mlp

ROW = [round(0.1 * i, 1) for i in range(16)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="kiln's max_queue_delay_ms")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    model = mlp(work / "tiny.onnx", 16, 32, 4)
    kiln_body = work / "kiln.json"
    kiln_body.write_text(json.dumps({"engine": "tiny", "inputs": [ROW]}))
    app_body = work / "app.json"
    app_body.write_text(json.dumps({"inputs": [ROW]}))

    kiln = start_kiln(work / "store")
    upload(kiln, model, "tiny", max_batch_size=8, max_queue_delay_ms=args.delay_ms)
    baseline = start_python_app(Path(__file__).with_name("handwritten_app.py"), str(model))
    wait_http(f"{baseline.url}/docs")
    results: dict[str, list[dict[str, float]]] = {"kiln": [], "hand-written app": []}
    try:
        for _ in range(args.runs):
            for name, server, body in (("kiln", kiln, kiln_body), ("hand-written app", baseline, app_body)):
                cpu_before = server.cpu_seconds()
                run = hey(f"{server.url}/predict", body, seconds=args.seconds, concurrency=args.concurrency)
                run["cpu_us_per_request"] = (server.cpu_seconds() - cpu_before) / max(run["ok"], 1) * 1e6
                results[name].append(run)
    finally:
        kiln.stop()
        baseline.stop()
    print(
        f"tiny MLP 16->32->4, hey -z {args.seconds}s -c {args.concurrency}, {args.runs} runs each (medians)"
    )
    print(f"{'server':<18} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'errors':>6}")
    for name, runs in results.items():
        print(
            f"{name:<18} {median([r['rps'] for r in runs]):>8.0f} "
            f"{median([r['p50_ms'] for r in runs]):>7.2f} {median([r['p99_ms'] for r in runs]):>7.2f} "
            f"{median([r['cpu_us_per_request'] for r in runs]):>10.0f} "
            f"{sum(r['errors'] for r in runs):>6.0f}"
        )
    ratio = median([r["rps"] for r in results["kiln"]]) / median(
        [r["rps"] for r in results["hand-written app"]]
    )
    print(f"kiln / hand-written throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
