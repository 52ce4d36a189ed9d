"""Calibration and validation samples: read them, check them against a signature, batch them.

Samples travel as ``dict[input name, np.ndarray]`` with the samples on axis 0 of every
array, all arrays holding the same number of samples.

The sample axis is the model's own first axis. For a batchable model that is the
batch axis. For a model that is served unbatched, the first axis of each input must be
dynamic or fixed at 1: the data still stacks samples on axis 0 (an input of shape
[1, 3, 32, 32] takes data of shape [N, 3, 32, 32]) and each sample is fed as the slice
``array[i:i + 1]``, which keeps the model's leading dimension of 1. Inputs with no such
axis (scalars, a fixed first dimension above 1) cannot be stacked and are refused.
``iter_batches(samples, 1)`` yields exactly those one-sample feeds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from engines.errors import CalibrationError
from engines.types import DYNAMIC, ShapeRange, Signature, TensorSpec

Samples = dict[str, np.ndarray]

SYNTHETIC_INT_HIGH = 4
"""Synthetic integer inputs are drawn from [0, SYNTHETIC_INT_HIGH): small enough to be a
valid index into almost any embedding table or one-hot width."""


def load_samples(
    path: Path,
    signature: Signature,
    *,
    purpose: str = "calibration",
    max_bytes: int | None = None,
) -> Samples:
    """Read an ``.npz`` of samples and check it against the model's signature.

    Returns one array per model input, cast to the input's dtype, samples on axis 0.
    Float data is accepted for float inputs (cast, e.g. float64 → float32) and integer
    data for integer inputs when every value fits the input's type; anything else is
    refused. ``max_bytes`` bounds both the file size and the uncompressed size of its
    arrays. Raises ``CalibrationError`` naming the problem and the input; ``purpose``
    ("calibration" or "validation") starts every message.
    """
    prefix = f"{purpose} data"
    _check_size(path, prefix, max_bytes)
    arrays = _read_npz(path, prefix)
    _check_names(arrays, signature, prefix)

    samples: Samples = {}
    for spec in signature.inputs:
        array = arrays[spec.name]
        _check_sample_axis(spec, prefix)
        _check_shape(array, spec, prefix)
        samples[spec.name] = _cast(array, spec, prefix)

    counts = {name: array.shape[0] for name, array in samples.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"'{name}': {count}" for name, count in counts.items())
        raise CalibrationError(
            f"{prefix}: inputs have different sample counts ({listing}); "
            "every input needs one entry per sample on axis 0"
        )
    return samples


def opt_dims(spec: TensorSpec, shapes: Sequence[ShapeRange] = ()) -> list[int]:
    """``spec``'s shape with each dynamic dim at the opt of its ``shapes`` range, else 1.

    An engine only accepts shapes inside its profile (TensorRT), so made-up inputs
    use the size it was tuned for.
    """
    given = next((r for r in shapes if r.input_name == spec.name and len(r.opt) == spec.rank), None)
    return [
        dim if dim != DYNAMIC else (given.opt[axis] if given is not None else 1)
        for axis, dim in enumerate(spec.shape)
    ]


def synthetic_samples(
    signature: Signature, count: int, *, seed: int = 0, shapes: Sequence[ShapeRange] = ()
) -> Samples:
    """Random samples shaped for the signature: ``count`` samples on axis 0.

    Floats are standard normal, integers are drawn from [0, SYNTHETIC_INT_HIGH), bools
    are fair coin flips. Dynamic dims other than the sample axis are at ``opt_dims``.
    Deterministic for a given seed. Raises ``CalibrationError`` for an input that has no
    sample axis or a dtype that cannot be made up.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    samples: Samples = {}
    for spec in signature.inputs:
        _check_sample_axis(spec, "synthetic data")
        shape = (count, *opt_dims(spec, shapes)[1:])
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            samples[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            samples[spec.name] = rng.integers(0, SYNTHETIC_INT_HIGH, size=shape).astype(dtype)
        elif dtype.kind == "b":
            samples[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise CalibrationError(
                f"synthetic data: input '{spec.name}' has dtype {spec.dtype}, "
                "for which kiln cannot make up samples"
            )
    return samples


def split_holdout(
    samples: Mapping[str, np.ndarray], fraction: float = 0.2, *, seed: int = 0
) -> tuple[Samples, Samples]:
    """Split samples into (calibration part, validation part), ``fraction`` for validation.

    Deterministic for a seed; each part keeps the original sample order. With at least
    two samples each part gets at least one. Raises ``CalibrationError`` for fewer than
    two samples and ``ValueError`` for a fraction outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    count = sample_count(samples)
    if count < 2:
        raise CalibrationError(
            f"cannot hold out validation samples from {count} sample(s); at least 2 are needed"
        )
    validation_count = min(max(round(count * fraction), 1), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    validation_index = np.sort(order[:validation_count])
    calibration_index = np.sort(order[validation_count:])
    calibration = {name: array[calibration_index] for name, array in samples.items()}
    validation = {name: array[validation_index] for name, array in samples.items()}
    return calibration, validation


def iter_batches(samples: Mapping[str, np.ndarray], batch_size: int) -> Iterator[Samples]:
    """Consecutive batches of ``batch_size`` samples along axis 0, the last one partial.

    The arrays are views into ``samples``. With ``batch_size=1`` each batch is one sample
    with its leading dimension of 1 kept, which is how unbatched models are fed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    count = sample_count(samples)
    for start in range(0, count, batch_size):
        yield {name: array[start : start + batch_size] for name, array in samples.items()}


def sample_count(samples: Mapping[str, np.ndarray]) -> int:
    """The number of samples (the length of axis 0, the same for every input).

    Raises ``CalibrationError`` when there are no inputs or the inputs disagree.
    """
    counts = {array.shape[0] if array.ndim else 0 for array in samples.values()}
    if not counts:
        raise CalibrationError("no samples: the data holds no inputs")
    if len(counts) > 1:
        raise CalibrationError(f"inputs have different sample counts: {sorted(counts)}")
    return counts.pop()


def _check_size(path: Path, prefix: str, max_bytes: int | None) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CalibrationError(f"{prefix}: cannot read the file: {exc.strerror}") from exc
    if max_bytes is None:
        return
    if size > max_bytes:
        raise CalibrationError(f"{prefix}: the file has {size} bytes, the limit is {max_bytes}")
    # An .npz is a zip: a small file can inflate into huge arrays, so bound the
    # uncompressed size from the zip's directory before numpy reads anything.
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: _read_npz says so with the right message
    if inflated > max_bytes:
        raise CalibrationError(
            f"{prefix}: the arrays take {inflated} bytes uncompressed, the limit is {max_bytes}"
        )


def _read_npz(path: Path, prefix: str) -> dict[str, np.ndarray]:
    not_npz = (
        f"{prefix}: not a readable .npz file; save the samples with numpy.savez(path, input_name=array, ...)"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{not_npz} ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CalibrationError(f"{not_npz} (it holds a single array, not named arrays)")
    arrays: dict[str, np.ndarray] = {}
    with loaded:
        for name in loaded.files:
            try:
                arrays[name] = loaded[name]
            except ValueError as exc:
                # allow_pickle=False refuses object arrays here, on access.
                raise CalibrationError(
                    f"{prefix}: array '{name}' cannot be read without unpickling; store plain numeric arrays"
                ) from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise CalibrationError(f"{prefix}: array '{name}' is corrupt ({exc})") from exc
    if not arrays:
        raise CalibrationError(f"{prefix}: the .npz holds no arrays")
    return arrays


def _check_names(arrays: Mapping[str, np.ndarray], signature: Signature, prefix: str) -> None:
    expected = [spec.name for spec in signature.inputs]
    missing = [name for name in expected if name not in arrays]
    unknown = sorted(name for name in arrays if name not in expected)
    problems = []
    if missing:
        problems.append(f"missing input(s) {', '.join(repr(n) for n in missing)}")
    if unknown:
        problems.append(f"unknown input(s) {', '.join(repr(n) for n in unknown)}")
    if problems:
        takes = ", ".join(repr(name) for name in expected)
        raise CalibrationError(f"{prefix}: {'; '.join(problems)}; the model takes {takes}")


def _check_sample_axis(spec: TensorSpec, prefix: str) -> None:
    if spec.rank == 0 or spec.shape[0] not in (DYNAMIC, 1):
        raise CalibrationError(
            f"{prefix}: input '{spec.name}' (shape {list(spec.shape)}) has no first axis that "
            "is dynamic or 1, so samples cannot be stacked on axis 0 for it"
        )


def _check_shape(array: np.ndarray, spec: TensorSpec, prefix: str) -> None:
    expected = ["N", *("any" if dim == DYNAMIC else str(dim) for dim in spec.shape[1:])]
    where = f"{prefix}: input '{spec.name}' has shape {list(array.shape)}"
    wanted = f"expected [{', '.join(expected)}] with N samples on axis 0"
    if array.ndim != spec.rank:
        raise CalibrationError(f"{where} (rank {array.ndim}), {wanted} (rank {spec.rank})")
    for axis in range(1, spec.rank):
        if spec.shape[axis] != DYNAMIC and array.shape[axis] != spec.shape[axis]:
            raise CalibrationError(f"{where}: dimension {axis} must be {spec.shape[axis]}; {wanted}")
    if array.shape[0] == 0 or array.size == 0:
        raise CalibrationError(f"{where}: it is empty; {wanted}, N at least 1")


def _cast(array: np.ndarray, spec: TensorSpec, prefix: str) -> np.ndarray:
    target = np.dtype(spec.dtype)
    where = f"{prefix}: input '{spec.name}'"
    refused = CalibrationError(
        f"{where} has dtype {array.dtype}, the model takes {spec.dtype}; "
        f"store {_kind_name(target)} data for it"
    )
    if target.kind == "f":
        if array.dtype.kind != "f":
            raise refused
        _check_finite(array, where)
        with np.errstate(over="ignore"):  # overflow is reported below, by count
            cast = array.astype(target, copy=False)
        if cast.dtype != array.dtype and not np.isfinite(cast).all():
            overflow = int(np.count_nonzero(~np.isfinite(cast)))
            raise CalibrationError(f"{where}: {overflow} value(s) overflow {spec.dtype}")
        return cast
    if target.kind in "iu":
        if array.dtype.kind not in "iu":
            raise refused
        if array.dtype != target:
            limits = np.iinfo(target)
            low, high = int(array.min()), int(array.max())
            if low < limits.min or high > limits.max:
                raise CalibrationError(
                    f"{where} has dtype {array.dtype} with values in [{low}, {high}], which do "
                    f"not fit {spec.dtype} [{limits.min}, {limits.max}]"
                )
        return array.astype(target, copy=False)
    if array.dtype != target:
        raise refused
    return array


def _check_finite(array: np.ndarray, where: str) -> None:
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    if nan or inf:
        raise CalibrationError(f"{where} has non-finite values: {nan} NaN and {inf} inf out of {array.size}")


def _kind_name(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return "floating-point"
    if dtype.kind in "iu":
        return "integer"
    return str(dtype)
