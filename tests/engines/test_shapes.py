"""Shapes of dynamic dimensions: which source wins, shared symbolic names, the default,
and the `shapes` option checked against the signature."""

from __future__ import annotations

import numpy as np
import pytest

from engines.shapes import DEFAULT_DIM, resolve_shapes, synthetic_inputs, validate_shapes_option
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


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (ShapeRange("pixels", (1,), (1,), (1,)), "no input of that name"),
        (ShapeRange("images", (1, 3, 32), (1, 3, 32), (1, 3, 32)), "has rank 3"),
        (ShapeRange("images", (1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32)), "fixed at 3"),
        (ShapeRange("images", (1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 64, 64)), "min <= opt <= max"),
    ],
)
def test_a_bad_option_is_refused_with_what_to_send(option: ShapeRange, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_shapes_option(IMAGES, [option])
