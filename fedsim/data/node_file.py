"""A node's own samples from a local `.npz` file (deployment node config `data-path`).

The file holds two arrays, `x` (N, *spec.shape) and `y` (N,) integer labels, and must match the
run's dataset spec: the model the server sends is built for that spec, so a mismatch would fail
mid-round with a shape error instead of one line at the start. Loaded without pickle.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedsim.errors import UserInputError
from models import InputSpec

ARRAY_NAMES = ("x", "y")


def load_node_samples(path: Path, spec: InputSpec, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """x and y from `path`, checked against `spec` (the run's dataset `dataset`)."""
    where = f"node data-path {str(path)!r}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if sorted(archive.files) != sorted(ARRAY_NAMES):
                raise UserInputError(
                    f"{where} holds arrays {sorted(archive.files)}; save exactly x and y "
                    "(np.savez(path, x=inputs, y=labels))"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(
            f"{where} is not a readable .npz of plain arrays ({error}); save it with np.savez"
        ) from None
    wanted = np.int64 if spec.modality == "tokens" else np.float32
    if x.dtype != wanted or tuple(x.shape[1:]) != spec.shape or len(x) < 1:
        raise UserInputError(
            f"{where}: x must be {np.dtype(wanted).name} of shape (N >= 1, "
            f"{', '.join(map(str, spec.shape))}) like dataset {dataset!r}, got {x.dtype} {x.shape}"
        )
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        raise UserInputError(
            f"{where}: y must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}"
        )
    if not 0 <= int(y.min()) <= int(y.max()) < spec.num_classes:
        raise UserInputError(
            f"{where}: labels must lie in [0, {spec.num_classes}) like dataset {dataset!r}, "
            f"got {int(y.min())} .. {int(y.max())}"
        )
    if x.dtype == np.float32 and not np.isfinite(x).all():
        raise UserInputError(f"{where}: x holds NaN or Inf; clean the samples")
    if spec.value_range is not None:
        low, high = spec.value_range
        if x.min() < low or x.max() > high:
            raise UserInputError(
                f"{where}: x values span {float(x.min()):g} .. {float(x.max()):g}, outside dataset "
                f"{dataset!r}'s range [{low:g}, {high:g}]; scale them like the dataset"
            )
    vocab = spec.vocab_size
    if spec.modality == "tokens" and vocab is not None and not 0 <= x.min() <= x.max() < vocab:
        raise UserInputError(f"{where}: token ids must lie in [0, {spec.vocab_size})")
    return np.ascontiguousarray(x), y.astype(np.int64)
