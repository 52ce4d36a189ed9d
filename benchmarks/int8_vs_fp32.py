"""INT8 vs FP32 latency of the same conv model in ONNX Runtime on this CPU, side by side.

Builds ``conv_net`` (benchmarks/int8_models.py), quantizes it with kiln's
``quantize_int8`` (calibrated on random images), then times both models in one process
with the same session settings: warm-up, then runs interleaved FP32/INT8 so that
machine noise hits both alike, and the median per batch size.

    .venv/bin/python -m benchmarks.int8_vs_fp32 [--threads 2] [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.int8_models import CONV_NET_INPUT, CONV_NET_OUTPUT, conv_net
from engines.precision import quantize_int8
from engines.types import CalibrationMethod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--method", choices=[m.value for m in CalibrationMethod], default="minmax")
    parser.add_argument("--keep", type=Path, help="write the models here instead of a temp dir")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="kiln-int8-bench-") as temp:
        workdir = args.keep or Path(temp)
        fp32_path = conv_net(workdir / "conv_net.fp32.onnx", image_size=args.image_size)
        rng = np.random.default_rng(0)
        shape = (3, args.image_size, args.image_size)
        calibration = {
            CONV_NET_INPUT: rng.standard_normal((args.calibration_samples, *shape)).astype(
                np.float32
            )
        }
        int8_path = workdir / "conv_net.int8.onnx"
        started = time.perf_counter()
        report = quantize_int8(
            fp32_path, int8_path, calibration, method=CalibrationMethod(args.method)
        )
        quantize_seconds = time.perf_counter() - started

        fp32 = _session(fp32_path, args.threads)
        int8 = _session(int8_path, args.threads)
        print(
            f"conv_net 3x{args.image_size}x{args.image_size}, Conv 64-64-128-128; "
            f"{args.runs} interleaved runs after {args.warmup} warm-up; "
            f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s), "
            f"CPU: {_cpu_summary()}"
        )
        print(
            f"int8: {args.method} calibration on {args.calibration_samples} random images, "
            f"quantized in {quantize_seconds:.1f} s; {report['quantize_nodes']} Q / "
            f"{report['dequantize_nodes']} DQ nodes; "
            f"{report['size_before_bytes'] / 1e6:.2f} MB -> "
            f"{report['size_after_bytes'] / 1e6:.2f} MB"
        )
        print(
            f"{'batch':>5} | {'fp32 median ms':>14} | {'int8 median ms':>14} | {'speed-up':>8} | "
            f"{'fp32 min ms':>11} | {'int8 min ms':>11} | {'speed-up':>8} | {'cosine':>8}"
        )
        for batch in batch_sizes:
            feeds = {CONV_NET_INPUT: rng.standard_normal((batch, *shape)).astype(np.float32)}
            fp32_ms, int8_ms = _interleaved_times(fp32, int8, feeds, args.warmup, args.runs)
            cosine = _cosine(
                fp32.run([CONV_NET_OUTPUT], feeds)[0], int8.run([CONV_NET_OUTPUT], feeds)[0]
            )
            fp32_median, int8_median = statistics.median(fp32_ms), statistics.median(int8_ms)
            print(
                f"{batch:>5} | {fp32_median:>14.2f} | {int8_median:>14.2f} | "
                f"{fp32_median / int8_median:>7.2f}x | {min(fp32_ms):>11.2f} | "
                f"{min(int8_ms):>11.2f} | {min(fp32_ms) / min(int8_ms):>7.2f}x | {cosine:>8.5f}"
            )
    return 0


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _interleaved_times(
    first: ort.InferenceSession,
    second: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    warmup: int,
    runs: int,
) -> tuple[list[float], list[float]]:
    """Milliseconds of every timed run of each session, timing them alternately.

    The minimum is shown beside the median: on a shared machine other processes only
    ever add time, so the minimum is the steadier estimate of the model's own cost."""
    for _ in range(warmup):
        first.run(None, feeds)
        second.run(None, feeds)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for session, bucket in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            session.run(None, feeds)
            bucket.append((time.perf_counter() - started) * 1000)
    return times


def _cosine(reference: Any, candidate: Any) -> float:
    a, b = np.ravel(reference).astype(np.float64), np.ravel(candidate).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cpu_summary() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    flags = set(
        next(
            (
                line.split(":", 1)[1].split()
                for line in text.splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    )
    isa = [
        flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in flags
    ]
    return f"{model} ({', '.join(isa) or 'no AVX2'})"


if __name__ == "__main__":
    sys.exit(main())
