"""The baseline from docs/BENCHMARKS.md: what a user writes in an afternoon.

A FastAPI app that calls ONNX Runtime inline on the event loop, no batching.
Run: .venv/bin/python benchmarks/handwritten_app.py MODEL.onnx PORT
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
app = FastAPI()


class Request(BaseModel):
    inputs: list[list[float]]


@app.post("/predict")
async def predict(request: Request) -> dict:
    x = np.asarray(request.inputs, dtype=np.float32)
    (y,) = session.run(None, {input_name: x})
    return {"outputs": y.tolist()}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
