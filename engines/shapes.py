"""Concrete shapes for a model's dynamic dimensions, and the one way kiln makes up inputs.

Wherever kiln runs a model on inputs it made itself (latency profile, warm-up,
synthetic calibration or validation data, the smoke run of a converted graph) and
wherever TensorRT needs an optimization profile, each dynamic dimension needs a size.
``resolve_shapes`` takes it, per input, from the best source available:

1. ``"data"``: the user's calibration or validation samples (the shapes the model
   really sees);
2. ``"shapes option"``: the ``shapes`` build option's ``min``/``opt``/``max``;
3. ``"graph"``: what the graph declares: fixed dims stay fixed, and a symbolic
   dimension name shared with an input resolved above gets the same value;
4. ``"default"``: a dynamic axis 0 is 1 (a batch of one), and so is the first dynamic
   axis of an input whose axis 0 is fixed above 1 (state tensors such as [2, ?, 128]
   carry their batch there); any other dynamic dim is ``DEFAULT_DIM``.

Each ``ResolvedShape`` holds full shapes (batch axis included) and the source it came
from. Profiles and warm-up run at ``opt``. ``synthetic_inputs`` is the only function in
kiln that makes up input values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.types import DYNAMIC, ShapeRange, Signature, TensorSpec

DEFAULT_DIM = 64
"""The size of a dynamic non-batch dimension nothing else gives a size for: a multiple
of 32, so the strided convolutions of detectors and OCR nets divide it evenly, and long
enough for short sequences and audio frames."""

SYNTHETIC_INT_HIGH = 4
"""Synthetic integer inputs are drawn from [0, SYNTHETIC_INT_HIGH): small enough to be a
valid index into almost any embedding table or one-hot width."""

SOURCES = ("data", "shapes option", "graph", "default")

HOW_TO_GIVE_SHAPES = (
    "give the model's real input shapes with the `shapes` option "
    '(e.g. shapes={"images": {"min": [1, 3, 320, 320], "opt": [1, 3, 640, 640], '
    "\"max\": [1, 3, 1280, 1280]}}) or upload a 'validation' .npz of real inputs"
)


@dataclass(frozen=True)
class ResolvedShape:
    """The full (min, opt, max) shapes of one input and where their sizes came from."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max), "source": self.source}


Shapes = dict[str, ResolvedShape]


def has_sample_axis(spec: TensorSpec) -> bool:
    """Whether samples of this input stack on its own axis 0 (dynamic or 1 there)."""
    return spec.rank > 0 and spec.shape[0] in (DYNAMIC, 1)


def dim_names(model: Any) -> dict[str, tuple[str | None, ...]]:
    """The symbolic dimension names of each graph input of an ``onnx.ModelProto``
    (None for fixed or unnamed dims)."""
    names = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        names[value.name] = tuple(
            d.dim_param if d.HasField("dim_param") and d.dim_param else None for d in dims
        )
    return names


def validate_shapes(signature: Signature, shapes: tuple[ShapeRange, ...]) -> None:
    """Raise ``ValueError`` naming the input and what to send when a range cannot
    apply to the model: an unknown input, a wrong rank, a fixed dimension changed,
    or bounds not ordered 0 <= min <= opt <= max. Axis 0 of a batchable model is
    set by the batching limits, so its values are not checked."""
    inputs = {spec.name: spec for spec in signature.inputs}
    for given in shapes:
        spec = inputs.get(given.input_name)
        if spec is None:
            raise ValueError(
                f"shapes names input '{given.input_name}' that the model does not have; "
                f"its inputs are {sorted(inputs)}"
            )
        for label, bound in (("min", given.min), ("opt", given.opt), ("max", given.max)):
            if len(bound) != spec.rank:
                raise ValueError(
                    f"shapes.{spec.name}.{label} {list(bound)} has rank {len(bound)}; the input has "
                    f"rank {spec.rank} (shape {list(spec.shape)}, -1 = dynamic)"
                )
        for axis, dim in enumerate(spec.shape):
            if signature.batchable and axis == 0:
                continue
            low, opt, high = given.min[axis], given.opt[axis], given.max[axis]
            if dim >= 0 and (low, opt, high) != (dim, dim, dim):
                raise ValueError(
                    f"shapes.{spec.name}: the model fixes dimension {axis} at {dim}; "
                    f"min, opt and max must all be {dim} there"
                )
            if not 0 <= low <= opt <= high:
                raise ValueError(
                    f"shapes.{spec.name} dimension {axis}: need 0 <= min <= opt <= max, "
                    f"got min={low}, opt={opt}, max={high}"
                )


def resolve_shapes(
    signature: Signature,
    shapes_option: Iterable[ShapeRange] = (),
    samples: Sequence[Mapping[str, np.ndarray]] = (),
    *,
    names: Mapping[str, Sequence[str | None]] | None = None,
    batch: tuple[int, int, int] = (1, 1, 1),
) -> Shapes:
    """The (min, opt, max) shape of every input, and its source (see the module doc).

    ``samples``: sample sets (calibration, validation) in ``load_samples``' layout.
    ``names``: symbolic dim names per input (``dim_names(model)``), so shared names
    get one value. ``batch``: the (min, opt, max) of a batchable model's axis 0.
    Assumes ``validate_shapes`` passed.
    """
    option = {shape_range.input_name: shape_range for shape_range in shapes_option}
    names = names or {}
    resolved: Shapes = {}
    # Values of symbolic dims fixed by data or the option, for inputs that share them.
    known: dict[str, tuple[int, int, int]] = {}

    def batch_axis(spec: TensorSpec, axis: int) -> bool:
        return signature.batchable and axis == 0

    for spec in signature.inputs:
        from_data = [
            _sample_shape(spec, sample_set[spec.name]) for sample_set in samples if spec.name in sample_set
        ]
        given = option.get(spec.name)
        if not from_data and given is None:
            continue
        bounds: list[tuple[int, int, int]] = []
        for axis, dim in enumerate(spec.shape):
            if batch_axis(spec, axis):
                bounds.append(batch)
            elif dim != DYNAMIC:
                bounds.append((dim, dim, dim))
            elif from_data:
                sizes = [shape[axis] for shape in from_data]
                low, high = min(sizes), max(sizes)
                if given is not None:
                    low, high = min(low, given.min[axis]), max(high, given.max[axis])
                bounds.append((low, sizes[0], high))
            else:
                assert given is not None
                bounds.append((given.min[axis], given.opt[axis], given.max[axis]))
        resolved[spec.name] = _triple(bounds, "data" if from_data else "shapes option")
        for axis, name in enumerate(names.get(spec.name, ())):
            if name and not batch_axis(spec, axis):
                known.setdefault(name, bounds[axis])

    for spec in signature.inputs:
        if spec.name in resolved:
            continue
        source = "graph"
        bounds = []
        first_dynamic = True
        spec_names = tuple(names.get(spec.name, ())) or (None,) * spec.rank
        for axis, dim in enumerate(spec.shape):
            name = spec_names[axis] if axis < len(spec_names) else None
            if batch_axis(spec, axis):
                bounds.append(batch)
            elif dim != DYNAMIC:
                bounds.append((dim, dim, dim))
            elif name and name in known:
                bounds.append(known[name])
            else:
                source = "default"
                batch_like = axis == 0 or (first_dynamic and spec.shape[0] not in (DYNAMIC, 1))
                size = 1 if batch_like else DEFAULT_DIM
                bounds.append((size, size, size))
                if name:
                    known[name] = bounds[-1]
            if dim == DYNAMIC:
                first_dynamic = False
        resolved[spec.name] = _triple(bounds, source)
    return resolved


def report(shapes: Mapping[str, ResolvedShape]) -> dict[str, Any]:
    """The build report's view: each input's shapes and source."""
    return {name: shape.to_dict() for name, shape in shapes.items()}


def synthetic_inputs(
    signature: Signature,
    shapes: Mapping[str, ResolvedShape] | None,
    rows: int = 1,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs at each input's ``opt`` shape, with ``rows`` rows on axis 0 of every
    input that has a sample axis (dynamic or 1 there); other inputs keep their shape.

    Floats are standard normal, integers are drawn from [0, SYNTHETIC_INT_HIGH), bools
    are fair coin flips. Deterministic for a seed. ``shapes`` None resolves the
    signature alone (graph and defaults). Raises ``ValueError`` for a dtype kiln cannot
    make values of.
    """
    if shapes is None:
        shapes = resolve_shapes(signature)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = list(shapes[spec.name].opt)
        if has_sample_axis(spec):
            shape[0] = rows
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, SYNTHETIC_INT_HIGH, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise ValueError(
                f"input '{spec.name}' has dtype {spec.dtype}, for which kiln cannot make up values"
            )
    return feeds


def _sample_shape(spec: TensorSpec, array: np.ndarray) -> tuple[int, ...]:
    """The shape of one sample as the model sees it (see engines.calibration's layout)."""
    if has_sample_axis(spec):
        return (1, *array.shape[1:])
    return tuple(array.shape[1:])


def _triple(bounds: Sequence[tuple[int, int, int]], source: str) -> ResolvedShape:
    return ResolvedShape(
        min=tuple(b[0] for b in bounds),
        opt=tuple(b[1] for b in bounds),
        max=tuple(b[2] for b in bounds),
        source=source,
    )
