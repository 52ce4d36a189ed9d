"""Every zoo model builds at fp32 and matches ONNX Runtime on the original; every
fp16, int8 and auto cell is ready within the agreement rules or refused with a
specific reason (never a bare library exception)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.zoo.harness import build_cell, passes
from tests.zoo.models import ZOO

pytestmark = pytest.mark.slow

PRECISIONS = ("fp32", "fp16", "int8", "auto")

SPECIFIC_REFUSALS = ("nothing to quantize", "outside tolerance", "needs", "already quantized", "upload")
"""A refusal names what is missing or inapplicable, in kiln's words."""


HTTP_COVERED = ("yolov8n", "silero-vad", "sklearn-mlp")
"""Built at every precision through the API in test_http.py instead."""
CHECKED_BY_MEANING = ("segformer", "detector-nms-in-if", "wav2vec2-words")
"""Built at the precisions their acceptance checks need in test_meaning.py; every cell
of theirs is in docs/MODELS.md (benchmarks/models_table.py)."""
MODELS = [model for model in ZOO if model.name not in HTTP_COVERED + CHECKED_BY_MEANING]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", MODELS, ids=[model.name for model in MODELS])
def test_zoo_cell(model, precision: str, zoo_dir: Path, tmp_path: Path) -> None:
    path = model.make(zoo_dir)
    cell = build_cell(model, path, precision, tmp_path / "store")
    if precision == "fp32":
        assert cell.state == "ready", cell.message
    if cell.state == "refused":
        assert any(words in cell.message for words in SPECIFIC_REFUSALS), cell.message
        assert "Traceback" not in cell.message
        return
    assert not passes(cell), (cell.agreement, passes(cell))
