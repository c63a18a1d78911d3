"""The data side of the model contract: a train/test split that carries its own `InputSpec`.

One type serves every modality: image tensors (float32 N×C×H×W), feature vectors (float32 N×F)
and token sequences (int64 N×T, with the tokenizer that made them). The checks run once, when a
dataset is built, so a registry entry that breaks the contract fails there rather than mid-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.data.text import WordTokenizer
from models import InputSpec

# The test split is fixed (not the run seed) so every run is scored on the same held-out data.
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """A train/test split: x (N, *spec.shape) of `spec.dtype`, y (N,) int64 class ids in
    [0, spec.num_classes). `tokenizer` turns text into the token ids (token data only)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: InputSpec
    tokenizer: WordTokenizer | None = None

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            _check_split(self.name, split, x, y, self.spec)
        tokens = self.spec.modality == "tokens"
        if tokens != (self.tokenizer is not None):
            raise ValueError(f"dataset {self.name!r}: token data needs its tokenizer, other data has none")
        if self.tokenizer is not None and len(self.tokenizer.vocabulary) != self.spec.vocab_size:
            raise ValueError(
                f"dataset {self.name!r}: vocabulary of {len(self.tokenizer.vocabulary)} words "
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
