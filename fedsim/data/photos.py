"""Natural RGB 32×32 crops from photos that ship inside scikit-image and scikit-learn.

Gradient-inversion papers attack natural images (CIFAR); CIFAR cannot be downloaded here, so we
cut crops from the CC0 / public-domain photos bundled with the libraries. The label of a crop
is the photo it came from, which makes the set usable by classifiers with a softmax head too.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
from skimage import data as skdata
from skimage.transform import resize
from sklearn.datasets import load_sample_images

PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "hubble",
    "immunohistochemistry",
    "retina",
    "china",
    "flower",
)
SHORT_SIDES: tuple[int, ...] = (64, 96, 128)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    sample = load_sample_images().images
    raw = [
        skdata.astronaut(),
        skdata.chelsea(),
        skdata.coffee(),
        skdata.rocket(),
        skdata.stereo_motorcycle()[0],
        skdata.hubble_deep_field(),
        skdata.immunohistochemistry(),
        skdata.retina(),
        sample[0],
        sample[1],
    ]
    return tuple(np.asarray(p, dtype=np.float32) / 255.0 for p in raw)


@cache
def _rescaled(photo_index: int, short_side: int) -> np.ndarray:
    photo = _photos()[photo_index]
    height, width = photo.shape[:2]
    scale = short_side / min(height, width)
    shape = (max(short_side, round(height * scale)), max(short_side, round(width * scale)), 3)
    return resize(photo, shape, anti_aliasing=True).astype(np.float32)


def photo_crops(count: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` random crops as float32 (count, 3, size, size) in [0, 1], and their photo labels."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, len(PHOTO_NAMES), size=count)
    for i, label in enumerate(labels):
        photo = _rescaled(int(label), int(rng.choice(SHORT_SIDES)))
        top = int(rng.integers(0, photo.shape[0] - size + 1))
        left = int(rng.integers(0, photo.shape[1] - size + 1))
        images[i] = photo[top : top + size, left : left + size].transpose(2, 0, 1)
    return images, labels.astype(np.int64)
