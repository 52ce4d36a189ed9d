"""The accuracy gate: tolerances, metrics, and a trained classifier under FP16 and INT8."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from engines.accuracy import DEFAULT_TOLERANCE, check, compare, parse_tolerance
from engines.backends.base import Runner
from engines.precision import convert_fp16, quantize_int8
from engines.types import DYNAMIC, CalibrationMethod, Precision, Signature, TensorSpec
from tests.precision_models import (
    DIGITS_INPUT,
    DIGITS_OUTPUT,
    OrtRunner,
    digits_data,
    train_digits_classifier,
)

Outputs = dict[str, np.ndarray]


class FunctionRunner(Runner):
    """A runner computing its outputs with a Python function; records the batch sizes fed."""

    def __init__(
        self,
        signature: Signature,
        function: Callable[[Mapping[str, np.ndarray]], Outputs],
        max_batch_size: int = 16,
    ) -> None:
        super().__init__(signature, max_batch_size)
        self.function = function
        self.fed: list[tuple[int, ...]] = []

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        self.fed.append(next(iter(feeds.values())).shape)
        return self.function(feeds)


CLASSIFIER = Signature(
    inputs=(TensorSpec("x", "float32", (DYNAMIC, 4)),),
    outputs=(
        TensorSpec("probs", "float32", (DYNAMIC, 4)),
        TensorSpec("label", "int64", (DYNAMIC,)),
    ),
    batchable=True,
)


def classify(feeds: Mapping[str, np.ndarray]) -> Outputs:
    x = feeds["x"]
    return {"probs": x * 2.0, "label": np.argmax(x, axis=1).astype(np.int64)}


def samples(count: int = 20) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((count, 4)).astype(np.float32)}


# -- parse_tolerance ---------------------------------------------------------------------


def test_no_text_gives_the_defaults() -> None:
    assert parse_tolerance(None, Precision.INT8) == DEFAULT_TOLERANCE[Precision.INT8]
    assert parse_tolerance("  ", Precision.FP16) == DEFAULT_TOLERANCE[Precision.FP16]
    assert DEFAULT_TOLERANCE[Precision.FP16]["cosine_similarity"] >= 0.999
    assert DEFAULT_TOLERANCE[Precision.INT8]["top1_agreement"] >= 0.98


def test_user_values_merge_over_the_defaults() -> None:
    tolerance = parse_tolerance('{"top1_agreement": 0.9, "max_abs_error": 0.05}', Precision.INT8)

    assert tolerance["top1_agreement"] == 0.9
    assert tolerance["max_abs_error"] == 0.05
    assert tolerance["cosine_similarity"] == DEFAULT_TOLERANCE[Precision.INT8]["cosine_similarity"]


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown tolerance metric 'accuracy'; known metrics:"):
        parse_tolerance('{"accuracy": 0.9}', Precision.INT8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"top1_agreement": "high"}', r"'top1_agreement' must be a number, got \"high\""),
        ('{"top1_agreement": true}', r"'top1_agreement' must be a number, got true"),
        ('{"top1_agreement": 1.5}', r"'top1_agreement' must be between 0 and 1, got 1.5"),
        ('{"cosine_similarity": -2}', r"'cosine_similarity' must be between -1 and 1"),
        ('{"max_abs_error": -0.1}', r"'max_abs_error' must be >= 0"),
        ('{"max_rel_error": NaN}', r"'max_rel_error' must be a finite number"),
        ("[0.99]", r"must be a JSON object"),
        ("{top1: 0.9}", r"not valid JSON"),
    ],
)
def test_bad_tolerance_values_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tolerance(text, Precision.FP16)


# -- compare and check -------------------------------------------------------------------


def test_identical_engines_agree_perfectly_and_the_result_is_json() -> None:
    reference = FunctionRunner(CLASSIFIER, classify)
    candidate = FunctionRunner(CLASSIFIER, classify)

    comparison = compare(reference, candidate, samples(), [8, 1])

    json.dumps(comparison, allow_nan=False)
    assert comparison["batch_sizes"] == [1, 8]
    assert comparison["sample_count"] == 20
    probs = comparison["results"][1]["outputs"]["probs"]
    assert probs["cosine_similarity"] == pytest.approx(1.0)
    assert probs["top1_agreement"] == 1.0
    assert probs["max_abs_error"] == 0.0
    label = comparison["results"][1]["outputs"]["label"]
    assert label["exact_match"] == 1.0
    assert "top1_agreement" not in label and "cosine_similarity" not in label
    assert check(comparison, DEFAULT_TOLERANCE[Precision.INT8]) == []


def test_chunks_include_the_last_partial_batch() -> None:
    reference = FunctionRunner(CLASSIFIER, classify)
    candidate = FunctionRunner(CLASSIFIER, classify)

    compare(reference, candidate, samples(20), [8])

    assert [shape[0] for shape in candidate.fed] == [8, 8, 4]


def test_flipped_decisions_break_top1_with_the_numbers() -> None:
    def flip_two(feeds: Mapping[str, np.ndarray]) -> Outputs:
        outputs = classify(feeds)
        probs = outputs["probs"].copy()
        probs[:2] = -probs[:2]  # the first two rows of each batch pick another class
        return {"probs": probs, "label": np.argmax(probs, axis=1).astype(np.int64)}

    comparison = compare(
        FunctionRunner(CLASSIFIER, classify), FunctionRunner(CLASSIFIER, flip_two), samples(), [10]
    )
    violations = check(comparison, {"top1_agreement": 0.99, "exact_match": 0.5})

    assert violations == [
        "output 'probs' at batch 10: top1_agreement 0.8 < 0.99 "
        "(4 of 20 positions changed their top-1 over axis 1, 0 of them near-ties)"
    ]


def test_error_metrics_use_less_or_equal() -> None:
    def shifted(feeds: Mapping[str, np.ndarray]) -> Outputs:
        outputs = classify(feeds)
        return {"probs": outputs["probs"] + 0.01, "label": outputs["label"]}

    comparison = compare(
        FunctionRunner(CLASSIFIER, classify), FunctionRunner(CLASSIFIER, shifted), samples(), [4]
    )
    probs = comparison["results"][0]["outputs"]["probs"]

    assert probs["max_abs_error"] == pytest.approx(0.01, rel=1e-3)
    assert check(comparison, {"max_abs_error": 0.02}) == []
    [violation] = check(comparison, {"max_abs_error": 0.001})
    assert violation.startswith("output 'probs' at batch 4: max_abs_error 0.01")
    assert violation.endswith("> 0.001")


def test_close_values_are_shown_with_enough_digits_to_differ() -> None:
    comparison = {"results": [{"batch_size": 1, "outputs": {"y": {"cosine_similarity": 0.99899}}}]}

    assert check(comparison, {"cosine_similarity": 0.999}) == [
        "output 'y' at batch 1: cosine_similarity 0.99899 < 0.999"
    ]


def test_non_finite_candidate_values_always_fail() -> None:
    def broken(feeds: Mapping[str, np.ndarray]) -> Outputs:
        outputs = classify(feeds)
        probs = outputs["probs"].copy()
        probs[0, 0] = np.nan
        return {"probs": probs, "label": outputs["label"]}

    comparison = compare(
        FunctionRunner(CLASSIFIER, classify), FunctionRunner(CLASSIFIER, broken), samples(8), [8]
    )

    json.dumps(comparison, allow_nan=False)
    assert check(comparison, {}) == [
        "output 'probs' at batch 8: 1 NaN or inf value(s) where the reference is finite"
    ]


def test_a_shape_mismatch_is_reported() -> None:
    def truncated(feeds: Mapping[str, np.ndarray]) -> Outputs:
        outputs = classify(feeds)
        return {"probs": outputs["probs"][:, :3], "label": outputs["label"]}

    comparison = compare(
        FunctionRunner(CLASSIFIER, classify), FunctionRunner(CLASSIFIER, truncated), samples(), [5]
    )

    assert check(comparison, {}) == [
        "output 'probs' at batch 5: shape [5, 3] differs from the reference's [5, 4]"
    ]


def test_unbatched_engines_are_fed_one_sample_at_a_time() -> None:
    signature = Signature(
        inputs=(TensorSpec("x", "float32", (1, 4)),),
        outputs=(TensorSpec("probs", "float32", (1, 4)),),
        batchable=False,
        unbatched_reason="fixed batch",
    )

    def double(feeds: Mapping[str, np.ndarray]) -> Outputs:
        return {"probs": feeds["x"] * 2}

    candidate = FunctionRunner(signature, double, max_batch_size=1)
    comparison = compare(FunctionRunner(signature, double, 1), candidate, samples(6), [1, 8])

    assert comparison["batched"] is False
    assert comparison["batch_sizes"] == [1]
    assert candidate.fed == [(1, 4)] * 6
    assert comparison["results"][0]["outputs"]["probs"]["samples"] == 6
    assert comparison["results"][0]["outputs"]["probs"]["top1_agreement"] == 1.0


def test_batch_sizes_beyond_the_engines_are_refused() -> None:
    reference = FunctionRunner(CLASSIFIER, classify, max_batch_size=8)

    with pytest.raises(ValueError, match=r"batch size 16 is outside the engines' range 1..8"):
        compare(reference, FunctionRunner(CLASSIFIER, classify), samples(), [16])


def test_check_refuses_unknown_metrics() -> None:
    comparison = compare(
        FunctionRunner(CLASSIFIER, classify), FunctionRunner(CLASSIFIER, classify), samples(), [4]
    )

    with pytest.raises(ValueError, match="unknown tolerance metric"):
        check(comparison, {"accuracy": 0.9})


# -- a trained classifier under reduced precision -----------------------------------------


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return train_digits_classifier(tmp_path_factory.mktemp("digits"))


def test_the_trained_classifier_is_accurate(digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    model, _, x_test = digits
    _, _, _, y_test = digits_data()

    runner = OrtRunner(model, max_batch_size=len(x_test))
    predicted = runner.infer({DIGITS_INPUT: x_test})[DIGITS_OUTPUT].argmax(axis=1)

    assert np.mean(predicted == y_test) > 0.95


def test_int8_keeps_the_classifier_decisions(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, x_train, x_test = digits
    quantized = tmp_path / "digits.int8.onnx"
    quantize_int8(model, quantized, {DIGITS_INPUT: x_train[:200]}, method=CalibrationMethod.MINMAX)

    comparison = compare(OrtRunner(model), OrtRunner(quantized), {DIGITS_INPUT: x_test}, [1, 8])

    assert check(comparison, parse_tolerance(None, Precision.INT8)) == []
    for result in comparison["results"]:
        assert result["outputs"][DIGITS_OUTPUT]["top1_agreement"] >= 0.99
        assert result["outputs"][DIGITS_OUTPUT]["samples"] == len(x_test)

    strict = parse_tolerance('{"max_abs_error": 1e-9}', Precision.INT8)
    violations = check(comparison, strict)
    assert len(violations) == 2
    assert violations[0].startswith(f"output '{DIGITS_OUTPUT}' at batch 1: max_abs_error 0.")
    assert violations[0].endswith(" > 1e-09")


def test_fp16_keeps_the_classifier_decisions(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, _, x_test = digits
    converted = tmp_path / "digits.fp16.onnx"
    convert_fp16(model, converted)

    comparison = compare(OrtRunner(model), OrtRunner(converted), {DIGITS_INPUT: x_test}, [1, 8])

    assert check(comparison, parse_tolerance(None, Precision.FP16)) == []
    for result in comparison["results"]:
        assert result["outputs"][DIGITS_OUTPUT]["top1_agreement"] >= 0.99


# -- strict top-1, near ties, the class axis ---------------------------------------------


def test_a_near_tie_flip_is_a_flip_and_is_reported_beside_it() -> None:
    tied = {"x": np.array([[1.0, 0.999, 0.0, 0.0]] * 10, np.float32)}

    def swap_first_two(feeds: Mapping[str, np.ndarray]) -> Outputs:
        outputs = classify(feeds)
        outputs["probs"] = outputs["probs"][:, [1, 0, 2, 3]]
        return outputs

    comparison = compare(
        FunctionRunner(CLASSIFIER, classify), FunctionRunner(CLASSIFIER, swap_first_two), tied, [10]
    )
    probs = comparison["results"][0]["outputs"]["probs"]
    assert probs["top1_agreement"] == 0.0
    assert probs["top1_flips"] == 10 and probs["top1_near_tie_flips"] == 10
    assert probs["cosine_similarity"] > 0.99  # the scores barely moved, the decisions did
    assert any("10 of them near-ties" in v for v in check(comparison, {"top1_agreement": 0.98}))


SEGMENTER = Signature(
    inputs=(TensorSpec("x", "float32", (DYNAMIC, 3, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", (DYNAMIC, 5, 8, 8)),),
    batchable=True,
)


def test_segmentation_logits_are_judged_per_pixel_over_the_class_axis() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((5, 3)).astype(np.float32)

    def segment(feeds: Mapping[str, np.ndarray]) -> Outputs:
        return {"logits": np.einsum("cd,ndhw->nchw", weights, feeds["x"])}

    def one_pixel_wrong(feeds: Mapping[str, np.ndarray]) -> Outputs:
        logits = segment(feeds)["logits"].copy()
        logits[:, :, 0, 0] = -logits[:, :, 0, 0]  # pixel (0, 0) of every image changes class
        return {"logits": logits}

    data = {"x": rng.random((4, 3, 8, 8)).astype(np.float32)}
    comparison = compare(
        FunctionRunner(SEGMENTER, segment), FunctionRunner(SEGMENTER, one_pixel_wrong), data, [2]
    )
    logits = comparison["results"][0]["outputs"]["logits"]
    assert logits["rule"] == "top1:axis=1" and logits["decided_by"] == "top1_agreement"
    assert logits["top1_positions"] == 4 * 8 * 8  # one decision per pixel, not per image row
    assert logits["top1_flips"] == 4
    assert logits["top1_agreement"] == pytest.approx(1 - 4 / 256)


def test_an_embedding_is_judged_by_cosine_not_top1() -> None:
    encoder = Signature(
        inputs=(TensorSpec("x", "float32", (DYNAMIC, 4)),),
        outputs=(TensorSpec("last_hidden_state", "float32", (DYNAMIC, DYNAMIC, 4)),),
        batchable=True,
    )

    def encode(feeds: Mapping[str, np.ndarray]) -> Outputs:
        return {"last_hidden_state": np.repeat(feeds["x"][:, None, :], 3, axis=1)}

    comparison = compare(FunctionRunner(encoder, encode), FunctionRunner(encoder, encode), samples(), [4])
    hidden = comparison["results"][0]["outputs"]["last_hidden_state"]
    assert hidden["rule"] == "cosine" and hidden["decided_by"] == "cosine_similarity"
    assert "top1_agreement" not in hidden
