"""Shapes of dynamic dimensions: which source wins, shared symbolic names, the default,
and the `shapes` option checked against the signature before any build."""

from __future__ import annotations

import numpy as np
import pytest

from engines.shapes import DEFAULT_DIM, resolve_shapes, synthetic_inputs, validate_shapes
from engines.types import ShapeRange, Signature, TensorSpec

IMAGES = Signature(
    (TensorSpec("images", "float32", (-1, 3, -1, -1)),), (TensorSpec("y", "float32", (-1, 5)),), True
)
TEXT = Signature(
    (TensorSpec("ids", "int64", (-1, -1)), TensorSpec("mask", "int64", (-1, -1))),
    (TensorSpec("y", "float32", (-1, -1, 8)),),
    True,
)
STATEFUL = Signature(
    (
        TensorSpec("input", "float32", (-1, -1)),
        TensorSpec("state", "float32", (2, -1, 128)),
        TensorSpec("sr", "int64", ()),
    ),
    (TensorSpec("y", "float32", (-1, 1)),),
    False,
    "scalar",
)


def test_default_gives_batch_one_and_a_stride_friendly_size() -> None:
    shapes = resolve_shapes(IMAGES, batch=(1, 4, 8))
    assert shapes["images"].opt == (4, 3, DEFAULT_DIM, DEFAULT_DIM)
    assert shapes["images"].min == (1, 3, DEFAULT_DIM, DEFAULT_DIM)
    assert shapes["images"].source == "default"


def test_state_tensors_get_their_batch_like_axis_at_one() -> None:
    shapes = resolve_shapes(STATEFUL)
    assert shapes["input"].opt == (1, DEFAULT_DIM)
    assert shapes["state"].opt == (2, 1, 128)
    assert shapes["sr"].opt == () and shapes["sr"].source == "graph"


def test_the_option_sets_the_range_and_opt() -> None:
    option = [ShapeRange("images", (1, 3, 320, 320), (1, 3, 640, 640), (1, 3, 1280, 1280))]
    shapes = resolve_shapes(IMAGES, option, batch=(1, 2, 8))
    assert shapes["images"].min == (1, 3, 320, 320)
    assert shapes["images"].opt == (2, 3, 640, 640)
    assert shapes["images"].max == (8, 3, 1280, 1280)
    assert shapes["images"].source == "shapes option"


def test_data_comes_first_and_widens_the_option() -> None:
    option = [ShapeRange("images", (1, 3, 320, 320), (1, 3, 640, 640), (1, 3, 1280, 1280))]
    data = {"images": np.zeros((5, 3, 96, 128), np.float32)}
    shapes = resolve_shapes(IMAGES, option, [data])
    assert shapes["images"].opt == (1, 3, 96, 128)
    assert shapes["images"].min == (1, 3, 96, 128)
    assert shapes["images"].max == (1, 3, 1280, 1280)
    assert shapes["images"].source == "data"


def test_shared_symbolic_names_get_one_value() -> None:
    option = [ShapeRange("ids", (1, 16), (1, 32), (1, 128))]
    names = {"ids": ("batch", "sequence"), "mask": ("batch", "sequence")}
    shapes = resolve_shapes(TEXT, option, names=names)
    assert shapes["mask"].opt == (1, 32) and shapes["mask"].max == (1, 128)
    assert shapes["mask"].source == "graph"
    feeds = synthetic_inputs(TEXT, shapes, 3)
    assert feeds["ids"].shape == feeds["mask"].shape == (3, 32)


TOKENS = Signature(
    inputs=(TensorSpec("ids", "int64", (-1, -1)), TensorSpec("mask", "int64", (-1, 128))),
    outputs=(TensorSpec("y", "float32", (-1, 2)),),
    batchable=True,
)


def test_a_range_for_a_dynamic_dimension_passes() -> None:
    validate_shapes(TOKENS, (ShapeRange("ids", (1, 8), (4, 64), (8, 512)),))
    validate_shapes(TOKENS, ())


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (ShapeRange("ids", (1, 64), (1, 32), (1, 512)), "need 0 <= min <= opt <= max, got min=64, opt=32"),
        (ShapeRange("ids", (1, -1), (1, 8), (1, 8)), "got min=-1"),
        (ShapeRange("ids", (1,), (1,), (1,)), "shapes.ids.min [1] has rank 1; the input has rank 2"),
        (ShapeRange("mask", (1, 64), (1, 64), (1, 64)), "the model fixes dimension 1 at 128"),
        (ShapeRange("tokens", (1, 1), (1, 1), (1, 1)), "names input 'tokens' that the model does not have"),
    ],
)
def test_a_range_that_cannot_apply_names_the_problem(given: ShapeRange, message: str) -> None:
    with pytest.raises(ValueError, match="shapes") as raised:
        validate_shapes(TOKENS, (given,))
    assert message in str(raised.value)


def test_the_batch_axis_of_a_batchable_model_is_left_to_the_batching_limits() -> None:
    validate_shapes(TOKENS, (ShapeRange("mask", (99, 128), (1, 128), (0, 128)),))
