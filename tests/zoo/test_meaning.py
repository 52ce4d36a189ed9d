"""Acceptance checks on exported models whose outputs mean different things: a
segmenter judged per pixel, a detector with NMS inside an If at FP16, a speech model
on raw audio whose static INT8 fails and is repaired (a stage kept in FP32, or dynamic
INT8), and a failing INT8 build that calibrates once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.zoo.harness import build_cell, passes
from tests.zoo.models import BY_NAME

pytestmark = pytest.mark.slow


def test_segmenter_int8_is_judged_per_pixel_over_the_class_axis(zoo_dir: Path, tmp_path: Path) -> None:
    zoo = BY_NAME["segformer"]
    cell = build_cell(zoo, zoo.make(zoo_dir), "int8", tmp_path)
    assert cell.state == "ready", cell.message
    logits = cell.report["accuracy"]["results"][0]["outputs"]["logits"]
    assert logits["rule"] == "top1:axis=1" and logits["decided_by"] == "top1_agreement"
    # One decision per pixel of the [N, 3, 16, 16] logits, none per image row or width.
    assert logits["top1_positions"] == logits["samples"] * 16 * 16
    assert not passes(cell), cell.agreement


def test_detector_with_nms_inside_an_if_builds_fp16_within_tolerance(zoo_dir: Path, tmp_path: Path) -> None:
    zoo = BY_NAME["detector-nms-in-if"]
    cell = build_cell(zoo, zoo.make(zoo_dir), "fp16", tmp_path)
    assert cell.state == "ready" and cell.served == "fp16", cell.message
    transform = cell.report["transform"]
    assert any(node.startswith("NonMaxSuppression in If") for node in transform["fp32_subgraph_nodes"])
    # Boxes and scores by cosine, labels exactly, on held-out scenes kiln never saw.
    rules = {name: metrics["decided_by"] for name, metrics in cell.agreement.items()}
    assert rules == {"boxes": "cosine_similarity", "scores": "cosine_similarity", "labels": "exact_match"}
    assert not passes(cell), cell.agreement
    assert cell.agreement["labels"]["exact_match"] == 1.0


def test_speech_int8_is_repaired_by_a_stage_or_served_as_dynamic_int8(zoo_dir: Path, tmp_path: Path) -> None:
    zoo = BY_NAME["wav2vec2-words"]
    model = zoo.make(zoo_dir)
    plain = build_cell(zoo, model, "int8", tmp_path / "plain")
    assert plain.state == "refused" and "outside tolerance" in plain.message

    cell = build_cell(zoo, model, "int8", tmp_path / "repaired", repair=True, repair_max_nodes=8)
    assert cell.state == "ready" and cell.served == "int8", cell.message
    repair = cell.report["repair"]
    assert repair["passed"] and repair["chosen"]
    # The static repair keeps the raw-audio feature encoder's convolutions, as a stage.
    first_round = repair["rounds"][0]
    assert first_round["violations"] == []
    assert len(first_round["kept_fp32"]) == 5
    assert all("feature_extractor/conv_layers." in name for name in first_round["kept_fp32"])
    assert repair["dynamic_int8"]["passed"]
    mode = cell.report["transform"].get("mode", "static")
    assert repair["chosen"].startswith("dynamic" if mode == "dynamic" else "static")
    assert not passes(cell), cell.agreement


def test_a_failing_int8_build_calibrates_once_and_reports_its_phases(zoo_dir: Path, tmp_path: Path) -> None:
    zoo = BY_NAME["detector-nms-in-if"]
    cell = build_cell(
        zoo, zoo.make(zoo_dir), "int8", tmp_path, repair=True, tolerance=(("cosine_similarity", 0.9999999),)
    )
    assert cell.state == "refused" and "outside tolerance" in cell.message
    details = cell.report
    assert [entry["method"] for entry in details["repair"]["calibration_methods"]] == [
        "minmax",
        "percentile",
        "entropy",
    ]
    assert details["calibration"]["passes"] == 1
    assert {"pre_process", "collect"} <= set(details["calibration"]["timings_s"])
    assert {"precision", "build", "accuracy", "total"} <= set(details["timings_s"])
