"""How long an INT8 build that fails the accuracy gate takes, repair included.

A detector (YOLOv8n from the zoo, 320x320, calibrated on synthetic images: 24 as in
the zoo tests, or ``--calibration-samples``) is built
at INT8 with repair and a tolerance it cannot meet (cosine similarity 0.99999, where
INT8 reaches about 0.9995), so the build runs every calibration method and every
repair round its budgets allow, then fails: the path an operator waits on before the
version falls back to its baseline. Prints the total and each phase's time, and how
many calibration passes ran where the report says so.

The script uses only APIs that kiln has had since the repair existed, so the same file
measures an older checkout: ``PYTHONPATH=<checkout> python benchmarks/int8_failure.py``.

Run: ``PYTHONPATH=. python benchmarks/int8_failure.py [--model yolov8n] [--runs 1]
[--calibration-samples 24]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import BuildJob, run_build
from engines.errors import AccuracyRejected
from engines.store import EngineStore
from engines.types import BuildOptions, Precision, ShapeRange, engine_cache_key
from tests.zoo.harness import npz_bytes, put_bytes
from tests.zoo.models import BY_NAME

STRICT = (("cosine_similarity", 0.99999),)


def measure(model_name: str, root: Path, calibration_samples: int) -> dict:
    zoo = BY_NAME[model_name]
    path = zoo.make(root / "zoo")
    store = EngineStore(root / "store")
    rng = np.random.default_rng(0)
    options = BuildOptions(
        precision=Precision.INT8,
        max_batch_size=2,
        opt_batch_size=1,
        calibration_sha256=put_bytes(store, npz_bytes(zoo.samples(rng, calibration_samples))),
        validation_sha256=put_bytes(store, npz_bytes(zoo.samples(rng, 8))),
        tolerance=STRICT,
        shapes=tuple(
            ShapeRange(name, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
            for name, r in (zoo.shapes or {}).items()
        ),
    )
    sha = put_bytes(store, path.read_bytes(), model=True)
    key = engine_cache_key(sha, options, OnnxRuntimeBackend().device_signature())
    started = time.perf_counter()
    try:
        run_build(BuildJob(str(store.root), sha, options.to_dict(), "onnxruntime", key, (1, 2)))
        outcome = "served (unexpected: the tolerance should fail it)"
        details: dict = {}
    except AccuracyRejected as exc:
        outcome = "rejected"
        details = exc.details
    seconds = time.perf_counter() - started
    repair = details.get("repair", {})
    return {
        "model": model_name,
        "calibration_samples": calibration_samples,
        "outcome": outcome,
        "seconds": round(seconds, 1),
        "timings_s": details.get("timings_s"),
        "calibration": details.get("calibration"),
        "methods_tried": [m.get("method") for m in repair.get("calibration_methods", [])],
        "rounds": len(repair.get("rounds", [])),
        "repair_seconds": repair.get("seconds"),
        "stopped": repair.get("stopped"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--calibration-samples", type=int, default=24)
    args = parser.parse_args()
    for _ in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="int8-failure-"))
        try:
            print(json.dumps(measure(args.model, root, args.calibration_samples)))
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
