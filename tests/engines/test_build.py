"""Building real engines with the ONNX Runtime backend and checking their outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import BuildJob, run_build
from engines.shapes import synthetic_inputs
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, Signature, engine_cache_key
from tests.models import reference_outputs


def build(store: EngineStore, model: Path, options: BuildOptions | None = None) -> dict:
    options = options or BuildOptions(max_batch_size=8)
    sha = sha256_file(model)
    temp = store.temp_path()
    shutil.copyfile(model, temp)
    store.add_model(temp, sha)
    backend = OnnxRuntimeBackend()
    key = engine_cache_key(sha, options, backend.device_signature())
    phases: list[str] = []
    meta = run_build(
        BuildJob(str(store.root), sha, options.to_dict(), "onnxruntime", key, (1, 8)),
        lambda phase, fraction: phases.append(phase),
    )
    assert {"validate", "precision", "build", "commit"} <= set(phases)
    return meta


@pytest.mark.parametrize("name", ["mlp", "cnn", "two_in_two_out", "int64_embedding", "fixed_batch_one"])
def test_engine_outputs_equal_onnxruntime_on_the_original(
    name: str, model_files: dict[str, Path], tmp_path: Path
) -> None:
    store = EngineStore(tmp_path)
    meta = build(store, model_files[name])
    signature = Signature.from_dict(meta["signature"])
    runner = OnnxRuntimeBackend().load(
        store.artifact_path(meta["cache_key"], meta), signature, BuildOptions(max_batch_size=8)
    )
    try:
        for batch in (1, 3) if signature.batchable else (1,):
            feeds = synthetic_inputs(signature, None, batch, seed=batch)
            if signature.inputs[0].dtype == "int64":
                feeds = {k: np.random.default_rng(0).integers(0, 50, v.shape) for k, v in feeds.items()}
            got = runner.infer(feeds)
            want = reference_outputs(model_files[name], feeds)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)
    finally:
        runner.close()


def test_build_report_has_fusion_and_latency(model_files: dict[str, Path], tmp_path: Path) -> None:
    meta = build(EngineStore(tmp_path), model_files["mlp"])
    fusion = meta["report"]["fusion"]
    assert fusion["op_counts_before"] == {"Gemm": 2, "Relu": 1}
    # ONNX Runtime fuses Gemm + Relu into one FusedGemm node.
    assert fusion["nodes_after"] < fusion["nodes_before"]
    assert any(node["op_type"] == "FusedGemm" for node in fusion["fused_nodes"])
    assert set(meta["report"]["latency_ms"]) == {"1", "8"}
    assert meta["max_batch_size"] == 8
    assert meta["report"]["timings_s"]["total"] > 0


def test_unbatched_engine_reports_max_batch_one(model_files: dict[str, Path], tmp_path: Path) -> None:
    meta = build(EngineStore(tmp_path), model_files["fixed_batch_one"])
    assert meta["max_batch_size"] == 1
    assert meta["signature"]["batchable"] is False
    assert set(meta["report"]["latency_ms"]) == {"1"}
