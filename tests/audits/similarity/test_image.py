"""Image metrics: known values, the small-image SSIM window, and batch matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from audits.similarity.image import (
    image_report,
    label_accuracy,
    match_batch,
    mean_psnr,
    mse,
    psnr,
    ssim,
    ssim_window,
)
from fedsim.data.photos import photo_crops


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    images, _ = photo_crops(5, size=16, seed=3)
    return images


def test_identical_images_have_infinite_psnr_and_unit_ssim(crops: np.ndarray) -> None:
    assert np.all(np.isinf(psnr(crops, crops)))
    assert np.allclose(ssim(crops, crops), 1.0)
    assert np.all(mse(crops, crops) == 0.0)


def test_constant_offset_gives_known_psnr() -> None:
    """An offset of 0.1 everywhere is MSE 0.01, i.e. 20 dB at peak 1."""
    original = np.full((2, 3, 8, 8), 0.4, dtype=np.float32)
    shifted = original + 0.1
    assert np.allclose(mse(original, shifted), 0.01, atol=1e-7)
    assert np.allclose(psnr(original, shifted), 20.0, atol=1e-4)
    assert mean_psnr(original, shifted) == pytest.approx(20.0, abs=1e-4)


def test_torch_and_numpy_inputs_agree(crops: np.ndarray) -> None:
    noisy = np.clip(crops + 0.05 * np.random.default_rng(0).standard_normal(crops.shape), 0, 1)
    from_numpy = psnr(crops, noisy)
    from_torch = psnr(torch.from_numpy(crops), torch.from_numpy(noisy))
    assert np.allclose(from_numpy, from_torch)
    assert np.all((ssim(crops, noisy) > 0) & (ssim(crops, noisy) < 1))
    assert psnr(crops[0], noisy[0]).shape == (1,)  # a single (C, H, W) image is a batch of one


def test_ssim_window_fits_small_images() -> None:
    assert ssim_window(32, 32) == 7
    assert ssim_window(6, 16) == 5
    assert ssim_window(4, 4) == 3
    tiny = np.random.default_rng(1).random((1, 3, 4, 4))
    assert ssim(tiny, tiny)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim_window(2, 8)


def test_shape_mismatch_is_rejected(crops: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        mse(crops, crops[:2])
    with pytest.raises(ValueError, match="N, C, H, W"):
        mse(crops[0, 0], crops[0, 0])


def test_match_batch_recovers_a_permutation(crops: np.ndarray) -> None:
    permutation = np.array([3, 0, 4, 1, 2])
    shuffled = crops[permutation] + 0.01
    order = match_batch(crops, shuffled)
    assert np.allclose(shuffled[order], crops + 0.01)
    assert np.array_equal(permutation[order], np.arange(len(crops)))


def test_label_accuracy_is_a_multiset_overlap_unless_ordered() -> None:
    assert label_accuracy([1, 2, 2, 5], [2, 5, 1, 2]) == 1.0
    assert label_accuracy([1, 2, 2, 5], [2, 5, 1, 1]) == 0.75
    assert label_accuracy(torch.tensor([3, 4]), np.array([4, 3]), ordered=True) == 0.0
    with pytest.raises(ValueError, match="recovered labels"):
        label_accuracy([1, 2], [1], ordered=True)


def test_image_report_matches_before_scoring(crops: np.ndarray) -> None:
    permutation = np.array([2, 0, 1, 4, 3])
    report = image_report(crops, crops[permutation] + 0.1, np.arange(5), permutation)
    assert report["mse"] == pytest.approx(0.01, abs=1e-6)
    assert report["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert 0.0 < report["ssim"] < 1.0
    assert report["label_accuracy"] == 1.0
    assert len(report["psnr_per_image"]) == 5
    single = image_report(crops[:1], crops[:1])
    assert math.isinf(single["psnr"]) and single["label_accuracy"] is None
