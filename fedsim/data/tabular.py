"""Feature-vector data: tables that ship inside scikit-learn, scaled for an MLP.

Scaling uses the training split's statistics only (the test split is what a client never saw),
so each feature is min-max scaled to [0, 1] on the train split and test values outside the
train range are clipped: the declared value range holds for both splits, which attacks that
box their reconstructions to it rely on.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from fedsim.data.dataset import SPLIT_SEED, Dataset
from models import InputSpec


def min_max_scaled(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits scaled by the train split's per-feature minimum and range, as float32 in [0, 1]."""
    low = x_train.min(axis=0)
    span = np.where(x_train.max(axis=0) > low, x_train.max(axis=0) - low, 1.0)

    def scale(x: np.ndarray) -> np.ndarray:
        return np.clip((x - low) / span, 0.0, 1.0).astype(np.float32)

    return scale(x_train), scale(x_test)


def breast_cancer() -> Dataset:
    """Wisconsin diagnostic breast cancer: 569 tumours, 30 features, malignant (0) / benign (1);
    a stratified 80/20 split fixed by SPLIT_SEED."""
    bunch = load_breast_cancer()
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    x_train, x_test = min_max_scaled(x_train, x_test)
    spec = InputSpec.features(x_train.shape[1], num_classes=2)
    return Dataset("breast-cancer", x_train, y_train, x_test, y_test, spec)
