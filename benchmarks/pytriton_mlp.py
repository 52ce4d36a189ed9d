"""Triton beside kiln: the tiny MLP served by Triton's own C++ front ends and
dynamic batcher (the Triton build the `nvidia-pytriton` wheel bundles), calling
ONNX Runtime in the bound Python function, as a user of PyTriton would.

Runs in its own virtualenv, made with Debian's Python (the bundled server links
its libpython), not kiln's:

    /usr/bin/python3 -m venv /tmp/pytriton-venv
    /tmp/pytriton-venv/bin/pip install nvidia-pytriton==0.7.0 onnxruntime==1.32.0
    /tmp/pytriton-venv/bin/python benchmarks/pytriton_mlp.py MODEL.onnx HTTP_PORT GRPC_PORT METRICS_PORT

`benchmarks/protocols.py --pytriton-python /tmp/pytriton-venv/bin/python` starts it.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    model_path, http_port, grpc_port, metrics_port = sys.argv[1:5]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as kiln's default on 2 cores: leave a core to the front end
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": session.run(["y"], {"x": x})[0]}

    config = TritonConfig(http_port=int(http_port), grpc_port=int(grpc_port), metrics_port=int(metrics_port))
    with Triton(config=config) as triton:
        triton.bind(
            model_name="tiny",
            infer_func=infer,
            inputs=[Tensor(name="x", dtype=np.float32, shape=(16,))],
            outputs=[Tensor(name="y", dtype=np.float32, shape=(4,))],
            config=ModelConfig(max_batch_size=8, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
        )
        triton.serve()


if __name__ == "__main__":
    main()
