"""Calibration data: reading .npz files, checking them against a signature, batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.calibration import (
    iter_batches,
    load_samples,
    sample_count,
    split_holdout,
    synthetic_samples,
)
from engines.errors import CalibrationError
from engines.shapes import resolve_shapes
from engines.types import DYNAMIC, ShapeRange, Signature, TensorSpec

IMAGE = TensorSpec("image", "float32", (DYNAMIC, 1, 8, 8))
TOKENS = TensorSpec("tokens", "int64", (DYNAMIC, DYNAMIC))
LOGITS = TensorSpec("logits", "float32", (DYNAMIC, 10))

BATCHABLE = Signature(inputs=(IMAGE, TOKENS), outputs=(LOGITS,), batchable=True)
FIXED_BATCH_ONE = Signature(
    inputs=(TensorSpec("image", "float32", (1, 1, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", (1, 10)),),
    batchable=False,
    unbatched_reason="fixed first dimension",
)


def write_npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def good_arrays(count: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((count, 1, 8, 8)).astype(np.float32),
        "tokens": rng.integers(0, 100, size=(count, 5)).astype(np.int64),
    }


def test_loads_matching_samples(tmp_path: Path) -> None:
    arrays = good_arrays()
    samples = load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)

    assert set(samples) == {"image", "tokens"}
    np.testing.assert_array_equal(samples["image"], arrays["image"])
    assert samples["tokens"].dtype == np.int64
    assert sample_count(samples) == 6


def test_float64_is_cast_to_float32_and_small_ints_to_int64(tmp_path: Path) -> None:
    arrays = good_arrays()
    path = write_npz(
        tmp_path / "c.npz",
        image=arrays["image"].astype(np.float64),
        tokens=arrays["tokens"].astype(np.int32),
    )
    samples = load_samples(path, BATCHABLE)

    assert samples["image"].dtype == np.float32
    assert samples["tokens"].dtype == np.int64


def test_integers_that_do_not_fit_the_input_are_refused(tmp_path: Path) -> None:
    signature = Signature((TensorSpec("ids", "int32", (DYNAMIC, 3)),), (LOGITS,), True)
    path = write_npz(tmp_path / "c.npz", ids=np.full((2, 3), 2**40, dtype=np.int64))

    with pytest.raises(CalibrationError, match=r"input 'ids' has dtype int64 .* not fit int32"):
        load_samples(path, signature)


def test_missing_input_is_named(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "c.npz", image=good_arrays()["image"])

    with pytest.raises(CalibrationError, match=r"calibration data: missing input\(s\) 'tokens'"):
        load_samples(path, BATCHABLE)


def test_unknown_input_is_named(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "c.npz", **good_arrays(), extra=np.zeros((6, 2)))

    with pytest.raises(CalibrationError, match=r"unknown input\(s\) 'extra'"):
        load_samples(path, BATCHABLE)


def test_integer_data_for_a_float_input_is_refused(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["image"] = arrays["image"].astype(np.int64)

    with pytest.raises(CalibrationError, match=r"input 'image' has dtype int64, the model takes float32"):
        load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)


def test_float_data_for_an_integer_input_is_refused(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["tokens"] = arrays["tokens"].astype(np.float32)

    with pytest.raises(CalibrationError, match=r"input 'tokens' has dtype float32.*integer data"):
        load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)


def test_wrong_rank_is_refused(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["image"] = arrays["image"].reshape(6, 64)

    with pytest.raises(CalibrationError, match=r"input 'image' has shape \[6, 64\] \(rank 2\)"):
        load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)


def test_wrong_fixed_dimension_is_refused(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["image"] = np.zeros((6, 1, 8, 9), dtype=np.float32)

    with pytest.raises(CalibrationError, match=r"'image' .*dimension 3 must be 8"):
        load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)


def test_empty_arrays_are_refused(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "c.npz",
        image=np.zeros((0, 1, 8, 8), dtype=np.float32),
        tokens=np.zeros((0, 5), dtype=np.int64),
    )

    with pytest.raises(CalibrationError, match=r"input 'image' .*it is empty"):
        load_samples(path, BATCHABLE)


@pytest.mark.parametrize(("bad", "message"), [(np.nan, "1 NaN and 0 inf"), (np.inf, "0 NaN and 1 inf")])
def test_non_finite_values_are_refused_with_a_count(tmp_path: Path, bad: float, message: str) -> None:
    arrays = good_arrays()
    arrays["image"][2, 0, 3, 3] = bad

    with pytest.raises(CalibrationError, match=rf"input 'image' has non-finite values: {message}"):
        load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)


def test_float64_values_that_overflow_float16_are_refused(tmp_path: Path) -> None:
    signature = Signature((TensorSpec("x", "float16", (DYNAMIC, 2)),), (LOGITS,), True)
    path = write_npz(tmp_path / "c.npz", x=np.array([[1.0, 1e6]]))

    with pytest.raises(CalibrationError, match=r"input 'x': 1 value\(s\) overflow float16"):
        load_samples(path, signature)


def test_mismatched_sample_counts_are_refused(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["tokens"] = arrays["tokens"][:4]

    with pytest.raises(CalibrationError, match=r"different sample counts \('image': 6, 'tokens': 4\)"):
        load_samples(write_npz(tmp_path / "c.npz", **arrays), BATCHABLE)


def test_a_file_that_is_not_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    path.write_text("image,tokens\n1,2\n")

    with pytest.raises(CalibrationError, match=r"not a readable \.npz file"):
        load_samples(path, BATCHABLE)


def test_a_single_npy_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.npy"
    np.save(path, good_arrays()["image"])

    with pytest.raises(CalibrationError, match=r"single array, not named arrays"):
        load_samples(path, BATCHABLE)


def test_a_truncated_npz_is_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "c.npz", **good_arrays(50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CalibrationError, match=r"not a readable \.npz|corrupt"):
        load_samples(path, BATCHABLE)


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, image=np.array([{"a": 1}], dtype=object), tokens=np.zeros((1, 5)))

    with pytest.raises(CalibrationError, match=r"array 'image' cannot be read without unpickling"):
        load_samples(path, BATCHABLE)


def test_size_limit_counts_uncompressed_bytes(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(
        path,
        image=np.zeros((500, 1, 8, 8), dtype=np.float32),
        tokens=np.zeros((500, 5), dtype=np.int64),
    )
    assert path.stat().st_size < 10_000

    with pytest.raises(CalibrationError, match=r"take \d+ bytes uncompressed, the limit is 10000"):
        load_samples(path, BATCHABLE, max_bytes=10_000)


def test_purpose_starts_the_message(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "v.npz", image=good_arrays()["image"])

    with pytest.raises(CalibrationError, match=r"^validation data: missing"):
        load_samples(path, BATCHABLE, purpose="validation")


def test_fixed_batch_of_one_stacks_samples_on_axis_0(tmp_path: Path) -> None:
    images = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    samples = load_samples(write_npz(tmp_path / "c.npz", image=images), FIXED_BATCH_ONE)

    feeds = list(iter_batches(samples, 1))
    assert len(feeds) == 5
    assert all(feed["image"].shape == (1, 1, 8, 8) for feed in feeds)
    np.testing.assert_array_equal(feeds[3]["image"][0], images[3])


def test_inputs_without_a_sample_axis_stack_on_a_new_axis(tmp_path: Path) -> None:
    # silero-vad's layout: a state tensor with its batch on axis 1 and a scalar rate.
    signature = Signature(
        (
            TensorSpec("state", "float32", (2, -1, 4)),
            TensorSpec("sr", "int64", ()),
            TensorSpec("x", "float32", (-1, 8)),
        ),
        (LOGITS,),
        False,
        "scalar",
    )
    state = np.arange(3 * 2 * 1 * 4, dtype=np.float32).reshape(3, 2, 1, 4)
    path = write_npz(tmp_path / "c.npz", state=state, sr=np.full(3, 16000), x=np.zeros((3, 8), np.float32))

    samples = load_samples(path, signature)
    feeds = list(iter_batches(samples, 1, signature))

    assert len(feeds) == 3
    assert feeds[1]["state"].shape == (2, 1, 4) and feeds[1]["sr"].shape == ()
    assert feeds[1]["x"].shape == (1, 8)
    np.testing.assert_array_equal(feeds[2]["state"], state[2])
    assert int(feeds[0]["sr"]) == 16000
    with pytest.raises(ValueError, match="one sample at a time"):
        next(iter_batches(samples, 2, signature))


def test_an_input_without_a_sample_axis_needs_the_extra_axis(tmp_path: Path) -> None:
    signature = Signature((TensorSpec("table", "float32", (3, 4)),), (LOGITS,), False, "fixed")
    path = write_npz(tmp_path / "c.npz", table=np.zeros((3, 4), dtype=np.float32))

    with pytest.raises(
        CalibrationError, match=r"input 'table' has shape \[3, 4\] \(rank 2\), expected \[N, 3, 4\]"
    ):
        load_samples(path, signature)


def test_synthetic_samples_follow_the_signature() -> None:
    shapes = resolve_shapes(BATCHABLE, [ShapeRange("tokens", (1, 3), (1, 3), (1, 3))])
    samples = synthetic_samples(BATCHABLE, 7, shapes)

    assert samples["image"].shape == (7, 1, 8, 8)
    assert samples["image"].dtype == np.float32
    assert samples["tokens"].shape == (7, 3)
    assert samples["tokens"].dtype == np.int64
    assert samples["tokens"].min() >= 0 and samples["tokens"].max() < 4
    again = synthetic_samples(BATCHABLE, 7, shapes)
    np.testing.assert_array_equal(samples["image"], again["image"])
    other = synthetic_samples(BATCHABLE, 7, shapes, seed=1)
    assert not np.array_equal(samples["image"], other["image"])


def test_synthetic_samples_for_a_fixed_batch_of_one() -> None:
    samples = synthetic_samples(FIXED_BATCH_ONE, 4)

    assert samples["image"].shape == (4, 1, 8, 8)


def test_split_holdout_is_deterministic_and_disjoint() -> None:
    samples = {"x": np.arange(10).reshape(10, 1), "y": np.arange(10) * 2}

    calibration, validation = split_holdout(samples, 0.2, seed=3)

    assert sample_count(calibration) == 8 and sample_count(validation) == 2
    together = sorted(calibration["x"][:, 0].tolist() + validation["x"][:, 0].tolist())
    assert together == list(range(10))
    np.testing.assert_array_equal(validation["y"], validation["x"][:, 0] * 2)
    again = split_holdout(samples, 0.2, seed=3)
    np.testing.assert_array_equal(again[1]["x"], validation["x"])


def test_split_holdout_leaves_one_sample_on_each_side() -> None:
    calibration, validation = split_holdout({"x": np.arange(2)}, 0.01)
    assert sample_count(calibration) == 1 and sample_count(validation) == 1

    calibration, validation = split_holdout({"x": np.arange(3)}, 0.99)
    assert sample_count(calibration) == 1 and sample_count(validation) == 2


def test_split_holdout_needs_two_samples_and_a_sane_fraction() -> None:
    with pytest.raises(CalibrationError, match=r"from 1 sample\(s\); at least 2"):
        split_holdout({"x": np.arange(1)})
    with pytest.raises(ValueError, match="fraction"):
        split_holdout({"x": np.arange(5)}, 1.0)


def test_iter_batches_yields_the_last_partial_batch() -> None:
    samples = {"x": np.arange(10), "y": np.arange(10) + 100}

    batches = list(iter_batches(samples, 4))

    assert [len(batch["x"]) for batch in batches] == [4, 4, 2]
    np.testing.assert_array_equal(batches[2]["y"], [108, 109])
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(samples, 0))


def test_sample_count_refuses_disagreeing_inputs() -> None:
    with pytest.raises(CalibrationError, match="different sample counts"):
        sample_count({"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(CalibrationError, match="no inputs"):
        sample_count({})
