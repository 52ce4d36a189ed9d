"""Calibration and validation samples: read them, check them against a signature, batch them.

Samples travel as ``dict[input name, np.ndarray]`` with the samples on axis 0 of every
array, all arrays holding the same number of samples.

The sample axis is the model's own first axis where it can be: for a batchable model
that is the batch axis. For a model that is served unbatched, an input whose first axis
is dynamic or fixed at 1 still stacks samples on axis 0 (an input of shape
[1, 3, 32, 32] takes data of shape [N, 3, 32, 32]) and each sample is fed as the slice
``array[i:i + 1]``, which keeps the model's leading dimension of 1. An input with no
such axis (a scalar, a state tensor of shape [2, ?, 128]) takes one extra leading axis
instead: data of shape [N, *shape] (a scalar's samples are a 1-D array of N values), and
sample i is fed as ``array[i]``. Such a model is never batchable, so it is fed one sample
at a time: ``iter_batches(samples, 1, signature)`` yields exactly those feeds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from engines.errors import CalibrationError
from engines.shapes import ResolvedShape, has_sample_axis, synthetic_inputs
from engines.types import DYNAMIC, Signature, TensorSpec

Samples = dict[str, np.ndarray]


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


def synthetic_samples(
    signature: Signature,
    count: int,
    shapes: Mapping[str, ResolvedShape] | None = None,
    *,
    seed: int = 0,
) -> Samples:
    """Random samples in the layout of ``load_samples``: ``count`` samples on axis 0,
    each at its input's ``opt`` shape (``engines.shapes.synthetic_inputs`` makes the
    values). Deterministic for a given seed. Raises ``CalibrationError`` for a dtype
    kiln cannot make values of."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    try:
        stacked = synthetic_inputs(signature, shapes, count, seed=seed)
    except ValueError as exc:
        raise CalibrationError(f"synthetic data: {exc}") from exc
    for spec in signature.inputs:
        if not has_sample_axis(spec):
            # The same value for every sample, on a new leading axis (the module doc's layout).
            stacked[spec.name] = np.repeat(stacked[spec.name][np.newaxis], count, axis=0)
    return stacked


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


def iter_batches(
    samples: Mapping[str, np.ndarray], batch_size: int, signature: Signature | None = None
) -> Iterator[Samples]:
    """Consecutive batches of ``batch_size`` samples along axis 0, the last one partial.

    The arrays are views into ``samples``. With ``batch_size=1`` each batch is one sample
    with its leading dimension of 1 kept, which is how unbatched models are fed; given
    the ``signature``, inputs without a sample axis get ``array[i]`` (see the module doc),
    which needs ``batch_size`` 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    indexed = {spec.name for spec in signature.inputs if not has_sample_axis(spec)} if signature else set()
    if indexed and batch_size != 1:
        raise ValueError(f"inputs {sorted(indexed)} have no sample axis: feed them one sample at a time")
    count = sample_count(samples)
    for start in range(0, count, batch_size):
        yield {
            # [start, ...] keeps a scalar sample a 0-d array, not a numpy scalar.
            name: array[start, ...] if name in indexed else array[start : start + batch_size]
            for name, array in samples.items()
        }


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


def _check_shape(array: np.ndarray, spec: TensorSpec, prefix: str) -> None:
    # A sample of an input without a sample axis is the whole input: N of them stack on
    # a new leading axis.
    per_sample = spec.shape[1:] if has_sample_axis(spec) else spec.shape
    expected = ["N", *("any" if dim == DYNAMIC else str(dim) for dim in per_sample)]
    where = f"{prefix}: input '{spec.name}' has shape {list(array.shape)}"
    wanted = f"expected [{', '.join(expected)}] with N samples on axis 0"
    if array.ndim != len(per_sample) + 1:
        raise CalibrationError(f"{where} (rank {array.ndim}), {wanted} (rank {len(per_sample) + 1})")
    for axis, dim in enumerate(per_sample, start=1):
        if dim != DYNAMIC and array.shape[axis] != dim:
            raise CalibrationError(f"{where}: dimension {axis} must be {dim}; {wanted}")
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
