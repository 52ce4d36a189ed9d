"""Upload to first prediction, with and without progressive engines, in one run.

For each model, a fresh server and store per mode (so no engine is reused): upload
with ``progressive=true`` or ``false``, and a client that sends KServe v2 binary
requests from the moment the upload is accepted, retrying while the version is not
servable (409/503). Reported: seconds from the upload's answer to the first 200, to
the baseline engine and to the optimized engine; requests and errors from the first
200 on; the server's resident memory before the upload, while serving on the
baseline, its peak while the optimized engine loads and swaps in, and after.

    .venv/bin/python -m benchmarks.progressive [--models convnet,yolov8n]

The real model is YOLOv8n as the ``nudenet`` package ships it (320n.onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from benchmarks.common import start_kiln
from benchmarks.int8_models import conv_net
from service.cli.bench import build_request

MIB = 1024 * 1024


@dataclass
class Case:
    name: str
    model: Path
    feeds: dict[str, np.ndarray]
    fields: dict[str, str]


@dataclass
class Run:
    uploaded_at: float = 0.0
    answers: list[tuple[float, int]] = field(default_factory=list)
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)


def cases(names: list[str], work: Path) -> list[Case]:
    rng = np.random.default_rng(0)
    found = []
    if "convnet" in names:
        found.append(
            Case(
                "conv net 3x64x64, INT8",
                conv_net(work / "convnet.onnx"),
                {"image": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)},
                {"precision": "int8", "calibration": "synthetic", "max_batch_size": "8"},
            )
        )
    if "yolov8n" in names:
        import nudenet

        shape = [1, 3, 320, 320]
        found.append(
            Case(
                "YOLOv8n 320x320 (nudenet), auto",
                Path(nudenet.__file__).with_name("320n.onnx"),
                {"images": rng.random(shape).astype(np.float32)},
                {
                    "precision": "auto",
                    "calibration": "synthetic",
                    "max_batch_size": "4",
                    "shapes": json.dumps({"images": {"min": shape, "opt": shape, "max": [4, 3, 320, 320]}}),
                },
            )
        )
    return found


def measure(case: Case, progressive: bool, work: Path) -> Run:
    run = Run()
    server = start_kiln(work / f"store-{progressive}")
    process = psutil.Process(server.process.pid)
    path, payload, headers = build_request("v2-binary", "m", None, case.feeds)
    done = threading.Event()

    def sample_memory() -> None:
        while not done.is_set():
            run.rss.append((time.time(), process.memory_info().rss))
            time.sleep(0.02)

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not done.is_set():
                code = client.post(path, content=payload, headers=headers).status_code
                run.answers.append((time.time(), code))
                if code in (409, 503):
                    time.sleep(0.01)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sender = threading.Thread(target=send, daemon=True)
    sampler.start()
    time.sleep(0.5)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.post(
                "/engines",
                files={"model": (case.model.name, case.model.read_bytes())},
                data={"name": "m", "progressive": str(progressive).lower(), **case.fields},
            )
            response.raise_for_status()
            run.uploaded_at = time.time()
            sender.start()
            while True:
                status = client.get("/engines/m").json()
                run.statuses.append((time.time(), status))
                if status["state"] in ("ready", "fallback", "failed"):
                    break
                time.sleep(0.05)
            time.sleep(2.0)  # load goes on after the swap
    finally:
        done.set()
        if sender.is_alive():
            sender.join(60)  # its last request is answered before the server drains
        server.stop()
    return run


def summary(run: Run) -> dict[str, Any]:
    final = run.statuses[-1][1]
    codes = [code for _, code in run.answers]
    first = codes.index(200) if 200 in codes else None
    baseline_since = next(
        (s["serving"]["since"] for _, s in run.statuses if s["state"] == "baseline" and s["serving"]), None
    )
    optimized_since = (
        final["serving"]["since"] if (final["serving"] or {}).get("tier") == "optimized" else None
    )
    # The optimized engine loads and warms up (beside the baseline, with progressive engines).
    load_started = next((t for t, s in run.statuses if s["phase"] == "load"), optimized_since)
    baseline_until = load_started or run.statuses[-1][0]
    before = [rss for t, rss in run.rss if t < run.uploaded_at]
    on_baseline = [rss for t, rss in run.rss if baseline_since and baseline_since < t < baseline_until]
    window = [
        rss for t, rss in run.rss if load_started and load_started - 0.1 <= t <= (optimized_since or 0) + 0.5
    ]
    after = [rss for t, rss in run.rss if optimized_since and t > optimized_since + 1.0]
    return {
        "state": final["state"],
        "serving": final["serving"],
        "error": final["error"],
        "first_200_s": None if first is None else run.answers[first][0] - run.uploaded_at,
        "baseline_s": None if baseline_since is None else baseline_since - run.uploaded_at,
        "optimized_s": None if optimized_since is None else optimized_since - run.uploaded_at,
        "requests_from_first_200": 0 if first is None else len(codes) - first,
        "errors_from_first_200": 0 if first is None else sum(1 for c in codes[first:] if c != 200),
        "error_codes": sorted({c for c in codes[first or 0 :] if c != 200}) if first is not None else [],
        "rss_mib": {
            "before_upload": round(max(before) / MIB) if before else None,
            "on_baseline": round(max(on_baseline) / MIB) if on_baseline else None,
            "peak_load_and_swap": round(max(window) / MIB) if window else None,
            "after": round(max(after) / MIB) if after else None,
        },
        "build_timings_s": ((final.get("report") or {}).get("timings_s")),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="convnet,yolov8n")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-progressive-"))
    os.chdir(work)  # the servers' build children may leave temporary files in their directory
    for case in cases(args.models.split(","), work):
        for progressive in (True, False):
            result = summary(measure(case, progressive, work / f"{case.model.stem}"))
            print(json.dumps({"model": case.name, "progressive": progressive, **result}), flush=True)


if __name__ == "__main__":
    main()
