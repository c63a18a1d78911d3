"""The data side of the model contract: a train/test split that carries its own `InputSpec`.

One type serves every modality: image tensors (float32 N×C×H×W), feature vectors (float32 N×F)
and token sequences (int64 N×T, with the tokenizer that made them). The checks run once, when a
dataset is built, so a registry entry that breaks the contract fails there rather than mid-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.data.text import TokenCodec, WordTokenizer
from models import InputSpec

# The test split is fixed (not the run seed) so every run is scored on the same held-out data.
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """A train/test split: x (N, *spec.shape) of `spec.dtype`, y (N,) int64 class ids in
    [0, spec.num_classes). `tokenizer` turns text into the token ids (token data only).

    A dataset generated from a continuous latent may carry it per sample (`covariate_train`,
    `covariate_test`, float32 (N,), named by `covariate_name`, e.g. the splash drops' impact
    height): the `covariate` partitioner gives each client a contiguous range of it, a label
    shift when the labels follow the covariate. `class_names`, when given, names each label.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: InputSpec
    tokenizer: TokenCodec | None = None
    covariate_train: np.ndarray | None = None
    covariate_test: np.ndarray | None = None
    covariate_name: str = ""
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.spec.num_classes:
            raise ValueError(
                f"dataset {self.name!r}: {len(self.class_names)} class names for "
                f"{self.spec.num_classes} classes"
            )
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            _check_split(self.name, split, x, y, self.spec)
        self._check_covariate()
        tokens = self.spec.modality == "tokens"
        if tokens != (self.tokenizer is not None):
            raise ValueError(f"dataset {self.name!r}: token data needs its tokenizer, other data has none")
        if self.tokenizer is not None and self.tokenizer.vocab_size != self.spec.vocab_size:
            raise ValueError(
                f"dataset {self.name!r}: vocabulary of {self.tokenizer.vocab_size} tokens "
                f"but spec.vocab_size {self.spec.vocab_size}"
            )

    @classmethod
    def from_texts(
        cls,
        name: str,
        train: tuple[Sequence[str], np.ndarray],
        test: tuple[Sequence[str], np.ndarray],
        num_classes: int,
        length: int,
        max_vocabulary: int | None = None,
    ) -> Dataset:
        """Labelled texts as token data: the tokenizer is fitted on the training texts only."""
        tokenizer = WordTokenizer.fit(train[0], length, max_vocabulary)
        spec = InputSpec.tokens(length, len(tokenizer.vocabulary), num_classes)
        return cls(
            name,
            tokenizer.encode(train[0]),
            np.asarray(train[1], dtype=np.int64),
            tokenizer.encode(test[0]),
            np.asarray(test[1], dtype=np.int64),
            spec,
            tokenizer,
        )

    def _check_covariate(self) -> None:
        covariates = (self.covariate_train, self.covariate_test)
        if all(c is None for c in covariates) and not self.covariate_name:
            return
        if any(c is None for c in covariates) or not self.covariate_name:
            raise ValueError(f"dataset {self.name!r}: a covariate needs both splits and a name")
        for split, covariate, y in (
            ("train", self.covariate_train, self.y_train),
            ("test", self.covariate_test, self.y_test),
        ):
            if (
                covariate.dtype != np.float32
                or covariate.shape != y.shape
                or not np.isfinite(covariate).all()
            ):
                raise ValueError(
                    f"dataset {self.name!r} ({split}): covariate must be finite float32 of shape {y.shape}"
                )

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.spec.shape


def _check_split(name: str, split: str, x: np.ndarray, y: np.ndarray, spec: InputSpec) -> None:
    where = f"dataset {name!r} ({split})"
    wanted = np.int64 if spec.modality == "tokens" else np.float32
    if x.dtype != wanted or tuple(x.shape[1:]) != spec.shape:
        raise ValueError(
            f"{where}: {spec.modality} samples must be {np.dtype(wanted).name} (N, {spec.shape}), "
            f"got {x.dtype} {x.shape}"
        )
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise ValueError(f"{where}: labels must be int64 of shape ({len(x)},), got {y.dtype} {y.shape}")
    if len(y) and not 0 <= y.min() <= y.max() < spec.num_classes:
        raise ValueError(f"{where}: labels must lie in [0, {spec.num_classes})")
    if not len(x):
        return
    if spec.modality != "tokens" and not np.isfinite(x).all():
        raise ValueError(f"{where}: values must be finite")
    low, high = (0, spec.vocab_size - 1) if spec.vocab_size is not None else spec.value_range or (None, None)
    if low is not None and not (x.min() >= low and x.max() <= high):
        raise ValueError(f"{where}: values must lie in [{low}, {high}], got [{x.min()}, {x.max()}]")
