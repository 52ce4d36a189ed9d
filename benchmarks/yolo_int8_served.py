"""YOLOv8n (nudenet's 320n.onnx) served at INT8 vs FP32 through kiln, side by side in
one server: throughput with KServe v2 binary requests driven by hey (alternating runs),
and how well the INT8 engine's detections agree with FP32's on held-out images.

    .venv/bin/python -m benchmarks.yolo_int8_served [--runs 2] [--seconds 8] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import alternating_v2_runs, print_int8_vs_fp32, start_kiln, wait_ready
from service.cli.bench import build_request

SIZE = 320
SHAPES = '{"images": {"min": [1, 3, 320, 320], "opt": [1, 3, 320, 320], "max": [1, 3, 320, 320]}}'
TOP_ANCHORS = 100


def images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Smooth random images in [0, 1] (low-frequency noise, as natural images' spectra)."""
    coarse = rng.random((count, 3, SIZE // 16, SIZE // 16)).astype(np.float32)
    return np.kron(coarse, np.ones((1, 1, 16, 16), np.float32))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes given as (cx, cy, w, h) rows."""
    a0, a1 = a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2
    b0, b1 = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None).prod(axis=1)
    union = a[:, 2:].prod(axis=1) + b[:, 2:].prod(axis=1) - inter
    return inter / np.maximum(union, 1e-9)


def agreement(fp32: np.ndarray, int8: np.ndarray) -> tuple[float, float]:
    """Over FP32's TOP_ANCHORS highest-scoring anchors: the fraction whose top class the
    INT8 engine agrees on, and the mean IoU of their boxes. Output rows: 4 box values,
    then the class scores; columns are anchors."""
    classes, boxes = [], []
    for ref, got in zip(fp32, int8, strict=True):
        scores = ref[4:].max(axis=0)
        top = np.argsort(scores)[-TOP_ANCHORS:]
        classes.append(np.argmax(ref[4:, top], axis=0) == np.argmax(got[4:, top], axis=0))
        boxes.append(box_iou(ref[:4, top].T, got[:4, top].T))
    return float(np.mean(np.concatenate(classes))), float(np.mean(np.concatenate(boxes)))


def infer(client: httpx.Client, name: str, image: np.ndarray) -> np.ndarray:
    response = client.post("/predict", json={"engine": name, "inputs": {"images": image.tolist()}})
    response.raise_for_status()
    return np.asarray(response.json()["outputs"]["output0"], dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-yolo-"))
    model = Path(str(importlib.metadata.distribution("nudenet").locate_file("nudenet/320n.onnx")))
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, images=images(rng, 64))
    calibration = buffer.getvalue()
    held_out = images(np.random.default_rng(1), 16)
    _, payload, v2_headers = build_request("v2-binary", "yolo", None, {"images": held_out[:1]})
    body = work / "body.bin"
    body.write_bytes(payload)

    server = start_kiln(work / "store")
    reports = {}
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            for name in ("fp32", "int8"):
                files = {"model": (model.name, model.read_bytes())}
                if name == "int8":
                    files["calibration"] = ("calibration.npz", calibration)
                fields = {"name": name, "precision": name, "max_batch_size": "4", "shapes": SHAPES}
                client.post("/engines", files=files, data=fields).raise_for_status()
                reports[name] = wait_ready(server, name)["report"]
            outputs = {
                name: np.stack([infer(client, name, x[None])[0] for x in held_out]) for name in reports
            }
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
    classes, iou = agreement(outputs["fp32"], outputs["int8"])
    cosine = float(
        np.sum(outputs["fp32"] * outputs["int8"])
        / (np.linalg.norm(outputs["fp32"]) * np.linalg.norm(outputs["int8"]))
    )
    print(
        f"YOLOv8n 320n.onnx at 1x3x{SIZE}x{SIZE}, INT8 vs FP32 in one kiln server, KServe v2 binary, "
        f"hey -c {args.concurrency} -z {args.seconds}s, {args.runs} alternating runs, medians"
    )
    print_int8_vs_fp32(results, reports, 4)
    print(
        f"INT8 vs FP32 on {len(held_out)} held-out images: top class agreement {classes:.3f} and mean box "
        f"IoU {iou:.3f} over each image's {TOP_ANCHORS} highest-scoring anchors; output cosine {cosine:.5f}"
    )


if __name__ == "__main__":
    main()
