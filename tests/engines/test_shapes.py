"""validate_shapes: a ``shapes`` build option checked against a signature before any build."""

from __future__ import annotations

import pytest

from engines.shapes import validate_shapes
from engines.types import ShapeRange, Signature, TensorSpec

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
