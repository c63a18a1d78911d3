"""Image-quality metrics for reconstructions, on [0, 1] images laid out (N, C, H, W).

Papers report PSNR with different peaks (breaching: 1 on [0, 1] images; COPA: 255) and call
different things SSIM (breaching: CW-SSIM). Fixing one convention here keeps this project's
numbers comparable with each other: peak 1, plain SSIM from scikit-image, Hungarian matching of
a reconstructed batch to the originals (the order of a reconstructed batch is arbitrary). The
auditor pairs differently (`audits.scoring.leakage`: each reconstruction with its nearest true sample),
because an attack on a multi-sample update may return fewer or more images than were trained on.
Averages use `reported_psnr`, capped at PSNR_CAP_DB so an exact recovery does not read as inf.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

ArrayLike = np.ndarray | torch.Tensor

# SSIM's default window (7) is larger than a tiny image; the window must be odd and >= 3.
DEFAULT_SSIM_WINDOW = 7
MIN_SSIM_WINDOW = 3


def as_images(images: ArrayLike) -> np.ndarray:
    """A float64 (N, C, H, W) array from a tensor or array of shape (N, C, H, W) or (C, H, W)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W) or (C, H, W), got {array.shape}")
    return array


def _pair(original: ArrayLike, reconstruction: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_images(original), as_images(reconstruction)
    if a.shape != b.shape:
        raise ValueError(f"original {a.shape} and reconstruction {b.shape} differ in shape")
    return a, b


def mse(original: ArrayLike, reconstruction: ArrayLike) -> np.ndarray:
    """Per-image mean squared error, shape (N,)."""
    a, b = _pair(original, reconstruction)
    return ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)


def psnr(original: ArrayLike, reconstruction: ArrayLike, peak: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB with peak 1 (images in [0, 1]); inf where the images are identical."""
    errors = mse(original, reconstruction)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak**2 / errors)


# float32 images that agree to the last bit are ~140 dB apart; beyond that PSNR measures rounding.
PSNR_CAP_DB = 150.0


def reported_psnr(original: ArrayLike, reconstruction: ArrayLike) -> np.ndarray:
    """Per-image PSNR (peak 1) capped at PSNR_CAP_DB: finite, so it can be averaged and plotted."""
    return np.minimum(psnr(original, reconstruction), PSNR_CAP_DB)


def mean_psnr(original: ArrayLike, reconstruction: ArrayLike, peak: float = 1.0) -> float:
    """Mean of per-image PSNRs (breaching's convention, not PSNR of the mean MSE)."""
    return float(np.mean(psnr(original, reconstruction, peak)))


def ssim_window(height: int, width: int) -> int:
    """The largest odd SSIM window <= 7 that fits the image; small images get 3 or 5."""
    side = min(height, width, DEFAULT_SSIM_WINDOW)
    window = side if side % 2 == 1 else side - 1
    if window < MIN_SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {MIN_SSIM_WINDOW}x{MIN_SSIM_WINDOW}, got {height}x{width}"
        )
    return window


def ssim(original: ArrayLike, reconstruction: ArrayLike) -> np.ndarray:
    """Per-image SSIM (scikit-image, data_range 1, channels averaged), shape (N,)."""
    a, b = _pair(original, reconstruction)
    window = ssim_window(a.shape[2], a.shape[3])
    scores = [
        structural_similarity(x, y, channel_axis=0, data_range=1.0, win_size=window)
        for x, y in zip(a, b, strict=True)
    ]
    return np.asarray(scores, dtype=np.float64)


def _labels(labels: ArrayLike | list[int]) -> list[int]:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return [int(v) for v in np.asarray(labels).reshape(-1)]


def label_accuracy(true_labels: ArrayLike, rec_labels: ArrayLike, ordered: bool = False) -> float:
    """Fraction of labels recovered.

    Unordered (default): multiset overlap, because label rules such as iDLG recover which classes
    are in the batch but not which sample carries which. Ordered: element-wise agreement.
    """
    truth, guess = _labels(true_labels), _labels(rec_labels)
    if not truth:
        raise ValueError("no true labels given")
    if ordered:
        if len(truth) != len(guess):
            raise ValueError(f"{len(truth)} true labels but {len(guess)} recovered labels")
        return float(np.mean([t == g for t, g in zip(truth, guess, strict=True)]))
    return label_overlap(truth, guess) / len(truth)


def label_overlap(true_labels: ArrayLike | list[int], rec_labels: ArrayLike | list[int]) -> int:
    """How many recovered labels match a distinct true label (multiset intersection size)."""
    overlap = Counter(_labels(true_labels)) & Counter(_labels(rec_labels))
    return sum(overlap.values())


def match_batch(original: ArrayLike, reconstruction: ArrayLike) -> np.ndarray:
    """Indices `order` such that reconstruction[order[i]] is paired with original[i].

    The pairing minimises the total MSE (Hungarian algorithm), so a batch reconstructed in a
    different order is scored image by image rather than against the wrong originals.
    """
    a, b = _pair(original, reconstruction)
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cost = ((flat_a[:, None, :] - flat_b[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(a), dtype=np.int64)
    order[rows] = cols
    return order


def image_report(
    original: ArrayLike,
    reconstruction: ArrayLike,
    true_labels: ArrayLike | None = None,
    rec_labels: ArrayLike | None = None,
) -> dict[str, Any]:
    """Mean MSE / PSNR / SSIM after matching, label accuracy (None without labels), per-image values."""
    a, b = _pair(original, reconstruction)
    order = match_batch(a, b) if len(a) > 1 else np.zeros(1, dtype=np.int64)
    b = b[order]
    errors, peaks, similarity = mse(a, b), psnr(a, b), ssim(a, b)
    accuracy = None
    if true_labels is not None and rec_labels is not None:
        accuracy = label_accuracy(true_labels, rec_labels)
    return {
        "mse": float(errors.mean()),
        "psnr": float(peaks.mean()),
        "ssim": float(similarity.mean()),
        "label_accuracy": accuracy,
        "order": order.tolist(),
        "psnr_per_image": peaks.tolist(),
        "ssim_per_image": similarity.tolist(),
    }
