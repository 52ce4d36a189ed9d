"""Does dynamic batching pay? A wide MLP whose batch-1 run is bound by reading its
weights, served with and without batching, side by side in one run, next to the
same runner called in-process (the limit) and with several instances.

    .venv/bin/python -m benchmarks.batching [--runs 2] [--seconds 8] [--concurrency 32]

Needs `hey` (Debian package). Prints one table; docs/BENCHMARKS.md records it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import hey, in_process_rows_per_second, median, start_kiln, upload
from engines.backends.onnxruntime import default_intra_op_threads
from tests.models import mlp

WIDTH_IN, HIDDEN, WIDTH_OUT = 512, 2048, 512


def mean_batch_size(metrics_text: str, engine: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "kiln_batch_size":
            for sample in family.samples:
                if sample.labels.get("engine") == engine:
                    if sample.name.endswith("_count"):
                        count += sample.value
                    elif sample.name.endswith("_sum"):
                        total += sample.value
    return total / count if count else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-batching-"))
    model = mlp(work / "wide.onnx", WIDTH_IN, HIDDEN, WIDTH_OUT)
    row = np.random.default_rng(1).standard_normal(WIDTH_IN).round(3).tolist()
    body = work / "body.json"
    body.write_text(json.dumps({"engine": "wide", "inputs": [row]}))

    configs = {
        "no batching (max_batch_size=1)": ({}, {"max_batch_size": 1}),
        "batching, max 32, delay 0": ({}, {"max_batch_size": 32, "max_queue_delay_ms": 0}),
        "batching, max 32, delay 2 ms": ({}, {"max_batch_size": 32, "max_queue_delay_ms": 2}),
        "batching, 2 instances, shared session": (
            {"KILN_INTRA_OP_THREADS": "1"},
            {"max_batch_size": 32, "instances": 2},
        ),
        "batching, 2 instances, session each": (
            {"KILN_INTRA_OP_THREADS": "1", "KILN_SESSION_PER_INSTANCE": "true"},
            {"max_batch_size": 32, "instances": 2},
        ),
    }
    rows: list[tuple[str, float, float, float, float]] = []
    for label, (env, fields) in configs.items():
        server = start_kiln(work / f"store-{len(rows)}", env)
        try:
            upload(server, model, "wide", **fields)
            runs = [
                hey(f"{server.url}/predict", body, seconds=args.seconds, concurrency=args.concurrency)
                for _ in range(args.runs)
            ]
            batch = mean_batch_size(httpx.get(f"{server.url}/metrics").text, "wide")
        finally:
            server.stop()
        rows.append(
            (
                label,
                median([r["rps"] for r in runs]),
                median([r["p50_ms"] for r in runs]),
                median([r["p99_ms"] for r in runs]),
                batch,
            )
        )
    threads = default_intra_op_threads()
    limits = {b: in_process_rows_per_second(model, "x", (WIDTH_IN,), b) for b in (1, 8, 32)}
    print(
        f"wide MLP {WIDTH_IN}->{HIDDEN}->{WIDTH_OUT} ({model.stat().st_size / 1e6:.0f} MB of weights), "
        f"hey -c {args.concurrency} -z {args.seconds}s, {args.runs} runs, medians"
    )
    print(f"{'server':<40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}")
    for label, rps, p50, p99, batch in rows:
        print(f"{label:<40} {rps:>8.0f} {p50:>8.1f} {p99:>8.1f} {batch:>10.1f}")
    baseline = rows[0][1]
    best = max(rows[1:], key=lambda r: r[1])
    print(f"batching / no batching: {best[1] / baseline:.2f}x ({best[0]})")
    print(f"in-process runner, {threads} intra-op thread(s), rows/s by batch size:")
    for batch, rate in limits.items():
        print(f"  batch {batch:>2}: {rate:>8.0f} rows/s")
    nearest = min(limits, key=lambda b: abs(b - best[4]))
    print(
        f"served / in-process at batch {nearest} (nearest to the served mean batch {best[4]:.1f}): "
        f"{best[1] / limits[nearest]:.2f}x"
    )


if __name__ == "__main__":
    main()
