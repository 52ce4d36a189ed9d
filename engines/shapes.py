"""Checks of the ``shapes`` build option against a model's signature, before any build."""

from __future__ import annotations

from engines.types import ShapeRange, Signature


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
