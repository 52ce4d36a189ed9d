"""INT8 vs FP32 latency of the same conv model in ONNX Runtime on this CPU, side by side.

Builds ``conv_net`` (benchmarks/int8_models.py) and quantizes it with kiln's
``quantize_int8`` twice, calibrated on random images: the TensorRT recipe (symmetric
activations, kiln's default) and the ONNX-Runtime-only recipe (calibrated activation
zero points). Then times the three models in one process with the same session
settings: warm-up, then runs interleaved so that machine noise hits all alike; prints
the median and the minimum per batch size, and the speed-up over FP32.

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

RECIPES = {
    "int8 trt": True,  # symmetric activations: what TensorRT accepts (the default)
    "int8 ort": False,  # calibrated activation zero points: ONNX Runtime only
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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
            CONV_NET_INPUT: rng.standard_normal((args.calibration_samples, *shape)).astype(np.float32)
        }
        print(
            f"conv_net 3x{args.image_size}x{args.image_size}, Conv 64-64-128-128; "
            f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s); "
            f"{args.runs} interleaved runs after {args.warmup} warm-up; CPU: {_cpu_summary()}"
        )
        sessions = {"fp32": _session(fp32_path, args.threads)}
        for name, symmetric in RECIPES.items():
            path = workdir / f"conv_net.{name.replace(' ', '_')}.onnx"
            started = time.perf_counter()
            report = quantize_int8(
                fp32_path,
                path,
                calibration,
                method=CalibrationMethod(args.method),
                symmetric_activations=symmetric,
            )
            print(
                f"{name}: {args.method} calibration on {args.calibration_samples} random "
                f"images, symmetric activations {symmetric}, quantized in "
                f"{time.perf_counter() - started:.1f} s, {report['quantize_nodes']} Q / "
                f"{report['dequantize_nodes']} DQ nodes, {report['size_before_bytes'] / 1e6:.2f}"
                f" MB -> {report['size_after_bytes'] / 1e6:.2f} MB"
            )
            sessions[name] = _session(path, args.threads)

        header = f"{'batch':>5} | {'statistic':>9} | {'fp32 ms':>8}"
        for name in RECIPES:
            header += f" | {name + ' ms':>11} | {'speed-up':>8}"
        print(header + " | cosine vs fp32")
        for batch in batch_sizes:
            feeds = {CONV_NET_INPUT: rng.standard_normal((batch, *shape)).astype(np.float32)}
            times = _interleaved_times(sessions, feeds, args.warmup, args.runs)
            reference = sessions["fp32"].run([CONV_NET_OUTPUT], feeds)[0]
            cosines = ", ".join(
                f"{_cosine(reference, sessions[name].run([CONV_NET_OUTPUT], feeds)[0]):.5f}"
                for name in RECIPES
            )
            for statistic, summarise in (("median", statistics.median), ("min", min)):
                fp32_ms = summarise(times["fp32"])
                row = f"{batch:>5} | {statistic:>9} | {fp32_ms:>8.2f}"
                for name in RECIPES:
                    int8_ms = summarise(times[name])
                    row += f" | {int8_ms:>11.2f} | {fp32_ms / int8_ms:>7.2f}x"
                print(row + (f" | {cosines}" if statistic == "median" else " |"))
    return 0


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _interleaved_times(
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[str, np.ndarray],
    warmup: int,
    runs: int,
) -> dict[str, list[float]]:
    """Milliseconds of every timed run of each session, timing them in turn.

    The minimum is shown beside the median: on a shared machine other processes only
    ever add time, so the minimum is the steadier estimate of the model's own cost."""
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def _cosine(reference: Any, candidate: Any) -> float:
    a, b = np.ravel(reference).astype(np.float64), np.ravel(candidate).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cpu_summary() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return f"{model} ({', '.join(flag for flag in wanted if flag in flags) or 'no AVX2'})"


if __name__ == "__main__":
    sys.exit(main())
