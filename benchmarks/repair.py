"""Precision repair: how long it takes against one unrepaired build, and zoo models.

Two parts (docs/BENCHMARKS.md, "Precision repair"):

- ``deep``: a torch CNN with DEEP_LAYERS convolutions (about 100 weighted nodes),
  exported with ``torch.onnx.export``, in three variants: healthy, with one layer whose
  activations overflow float16 (scaled up, the next layer scaled back), and with one
  layer with a few outlier channels (per-tensor INT8 ranges ruined). Times a healthy
  build at FP16 and INT8 (one unrepaired build, the whole pipeline), the defective
  builds with ``repair=false`` (rejected at the gate) and with repair (served).
- ``zoo``: zoo models (tests/zoo) at FP16 and INT8 without and with repair: which fail
  the gate, and what repair made of them.

Run: ``PYTHONPATH=. python benchmarks/repair.py deep`` or ``... zoo [--models a,b]``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import BuildJob, run_build
from engines.errors import EngineError
from engines.repair import weighted_node_count
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, Precision, ShapeRange, engine_cache_key

DEEP_LAYERS = 100
DEEP_CHANNELS = 16
DEEP_SIZE = 16
DEFECT_LAYER = 50
BATCH_SIZES = (1, 8)
SHOWN = ("precision", "accepted", "repaired", "kept_fp32", "latency_ms")


def build(
    root: Path,
    model: Path,
    precision: str,
    calibration: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    *,
    repair: bool,
    shapes: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], float]:
    """One build in a fresh store; returns (report or error, seconds)."""
    shutil.rmtree(root, ignore_errors=True)
    store = EngineStore(root)

    def put(data: bytes, is_model: bool = False) -> str:
        temp = store.temp_path()
        temp.write_bytes(data)
        sha = sha256_file(temp)
        (store.add_model if is_model else store.add_data)(temp, sha)
        return sha

    def npz(samples: dict[str, np.ndarray]) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **samples)
        return buffer.getvalue()

    options = BuildOptions(
        precision=Precision(precision),
        max_batch_size=max(BATCH_SIZES),
        calibration_sha256=put(npz(calibration)),
        validation_sha256=put(npz(validation)),
        repair=repair,
        shapes=tuple(
            ShapeRange(name, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
            for name, r in (shapes or {}).items()
        ),
    )
    model_sha = put(model.read_bytes(), True)
    key = engine_cache_key(model_sha, options, OnnxRuntimeBackend().device_signature())
    started = time.perf_counter()
    try:
        meta = run_build(BuildJob(str(root), model_sha, options.to_dict(), "onnxruntime", key, BATCH_SIZES))
        result = {"state": "ready", **meta["report"]}
    except EngineError as exc:
        result = {"state": "refused", "message": exc.message, **exc.details}
    return result, time.perf_counter() - started


def deep_cnn(path: Path, defect: str | None) -> Path:
    """DEEP_LAYERS 3x3 convolutions with ReLU, global pooling and a classifier."""
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, DEEP_CHANNELS, 3, padding=1), torch.nn.ReLU()]
    for _ in range(DEEP_LAYERS - 2):
        layers += [torch.nn.Conv2d(DEEP_CHANNELS, DEEP_CHANNELS, 3, padding=1), torch.nn.ReLU()]
    net = torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(DEEP_CHANNELS, 10)
    ).eval()
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:  # identity-like kernels keep activations in range through depth
            conv.weight.mul_(0.3)
            conv.weight[:, :, 1, 1] += torch.eye(DEEP_CHANNELS, conv.in_channels)
        layer, following = convs[DEFECT_LAYER], convs[DEFECT_LAYER + 1]
        if defect == "fp16":
            layer.weight.mul_(1e6)
            layer.bias.mul_(1e6)
            following.weight.div_(1e6)
        elif defect == "int8":
            outliers = [0, 5, 9]
            layer.weight[outliers] *= 300.0
            layer.bias[outliers] *= 300.0
            following.weight[:, outliers] /= 300.0
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, DEEP_SIZE, DEEP_SIZE),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def summary(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    repair = result.get("repair", {})
    row: dict[str, Any] = {"state": result["state"], "seconds": round(seconds, 2)}
    if result["state"] == "refused":
        row["message"] = result["message"][:300]
    if repair:
        row["repair"] = {
            key: repair.get(key)
            for key in (
                "passed",
                "stopped",
                "calibration_method",
                "latency_vs_fp32",
                "latency_vs_unrepaired",
                "seconds",
            )
            if key in repair
        }
        row["repair"]["kept_fp32"] = [f"{n['name']} ({n['op_type']})" for n in repair["kept_fp32"]]
        row["repair"]["rounds"] = len(repair["rounds"])
    return row


def run_deep(work: Path, precisions: list[str]) -> None:
    rng = np.random.default_rng(0)
    calibration = {"image": rng.random((64, 3, DEEP_SIZE, DEEP_SIZE), dtype=np.float32)}
    validation = {"image": rng.random((32, 3, DEEP_SIZE, DEEP_SIZE), dtype=np.float32)}
    healthy = deep_cnn(work / "healthy.onnx", None)
    print(f"deep CNN: {weighted_node_count(healthy)} weighted nodes")
    for precision in precisions:
        defective = deep_cnn(work / f"{precision}-defect.onnx", precision)
        store = work / "store"
        base, base_s = build(store, healthy, precision, calibration, validation, repair=False)
        rejected, rejected_s = build(store, defective, precision, calibration, validation, repair=False)
        repaired, repaired_s = build(store, defective, precision, calibration, validation, repair=True)
        auto, auto_s = build(store, defective, "auto", calibration, validation, repair=True)
        print(
            json.dumps(
                {
                    "precision": precision,
                    "healthy, unrepaired build": summary(base, base_s),
                    "defective, repair=false": summary(rejected, rejected_s),
                    "defective, repaired": summary(repaired, repaired_s),
                    "repaired build / unrepaired build": round(repaired_s / base_s, 2),
                    "defective, auto": {
                        "seconds": round(auto_s, 2),
                        "served": auto["precision"],
                        "choice": auto["choice"],
                        "candidates": [{k: c.get(k) for k in SHOWN} for c in auto["candidates"]],
                    },
                },
                indent=1,
            )
        )


def run_zoo(work: Path, names: list[str] | None) -> None:
    from tests.zoo.harness import data_for
    from tests.zoo.models import ZOO

    for model in ZOO:
        if names and model.name not in names:
            continue
        path = model.make(work)
        calibration, validation = data_for(model)
        for precision in ("fp16", "int8"):
            row = {"model": model.name, "precision": precision}
            plain, plain_s = build(
                work / "store", path, precision, calibration, validation, repair=False, shapes=model.shapes
            )
            row["repair=false"] = summary(plain, plain_s)
            if plain["state"] == "refused" and "outside tolerance" in plain["message"]:
                repaired, repaired_s = build(
                    work / "store", path, precision, calibration, validation, repair=True, shapes=model.shapes
                )
                row["repaired"] = summary(repaired, repaired_s)
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("deep", "zoo"))
    parser.add_argument("--models", help="comma-separated zoo model names (default: all)")
    parser.add_argument("--precisions", default="fp16,int8", help="deep: which defects to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-repair-") as scratch:
        if args.part == "deep":
            run_deep(Path(scratch), args.precisions.split(","))
        else:
            run_zoo(Path(scratch), args.models.split(",") if args.models else None)


if __name__ == "__main__":
    main()
