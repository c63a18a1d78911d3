"""The Cramér–Rao bound: tight where theory says so, split where J is rank-deficient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from audits.security.identifiability import identifiability
from audits.security.leakage_bound import (
    dp_sgd_sigma,
    leakage_bound,
    psnr_ceiling,
    update_noise_sigma,
    weight_delta_rounding_std,
)
from models import InputSpec, build_model
from models.classifiers import SequentialClassifier
from tests.support.bound_models import SINGULAR, NegativeLogit, mixing_matrix


def _measured_mse(mixing: Tensor, x: Tensor, row_std: Tensor, draws: int) -> float:
    """Mean squared error of the generalised least-squares reconstruction from -A x + noise."""
    a = mixing.numpy()
    weights = 1.0 / row_std.numpy() ** 2
    normal = a.T @ (weights[:, None] * a)
    rng = np.random.default_rng(1)
    noisy = -(a @ x.numpy()[0])[None] + rng.standard_normal((draws, 9)) * row_std.numpy()
    estimates = np.linalg.solve(normal, (a.T @ (weights[:, None] * -noisy.T)))
    return float(np.mean(np.sum((estimates.T - x.numpy()[0]) ** 2, axis=1)))


def test_bound_is_attained_by_least_squares_under_uniform_noise() -> None:
    mixing = mixing_matrix()
    torch.manual_seed(0)
    model = NegativeLogit(mixing).double()
    x, y, sigma = torch.rand(1, 6, dtype=torch.float64), torch.tensor([1]), 0.05
    bound = leakage_bound(identifiability(model, x, y), sigma, "test", peak=1.0)
    assert bound.identifiable == 6 and bound.unidentifiable == 0
    expected = sigma**2 * np.sum(1 / SINGULAR**2)
    assert bound.mse_floor * 6 == pytest.approx(expected, rel=1e-6)
    measured = _measured_mse(mixing, x, torch.full((9,), sigma, dtype=torch.float64), draws=4000)
    assert measured == pytest.approx(bound.mse_floor * 6, rel=0.10)
    assert bound.psnr_ceiling == pytest.approx(10 * math.log10(1 / bound.mse_floor))


def test_bound_is_attained_by_weighted_least_squares_under_known_uneven_noise() -> None:
    mixing = mixing_matrix()
    torch.manual_seed(0)
    model = NegativeLogit(mixing).double()
    x, y = torch.rand(1, 6, dtype=torch.float64), torch.tensor([2])
    stds = {n: torch.full_like(p, 0.3) for n, p in model.named_parameters() if p.requires_grad}
    row_std = torch.linspace(0.01, 0.2, 9, dtype=torch.float64)
    stds["out.weight"][2] = row_std  # the true class's row: the one that depends on x
    bound = leakage_bound(identifiability(model, x, y, noise_std=stds), 1.0, "per-coordinate")
    measured = _measured_mse(mixing, x, row_std, draws=4000)
    assert measured == pytest.approx(bound.mse_floor * 6, rel=0.10)
    uniform = leakage_bound(identifiability(model, x, y), float(row_std.max()))
    assert bound.mse_floor < uniform.mse_floor  # the precise rows help


def test_rank_deficient_j_bounds_the_identifiable_part_and_reports_the_rest() -> None:
    torch.manual_seed(0)
    spec = InputSpec((3, 8, 8), 10)
    net = SequentialClassifier(
        nn.Sequential(nn.Conv2d(3, 16, 2, stride=3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(144, 10)),
        spec,
    )
    ident = identifiability(net, torch.rand(1, 3, 8, 8), torch.tensor([0]))
    bound = leakage_bound(ident, 1e-3)
    assert (bound.identifiable, bound.unidentifiable) == (108, 84)
    assert bound.unidentifiable_fraction == pytest.approx(84 / 192)
    kept = ident.singular_values[:108]
    assert bound.mse_floor == pytest.approx(1e-6 * np.sum(1 / kept**2) / 192)
    assert bound.identifiable_mse_floor == pytest.approx(1e-6 * np.sum(1 / kept**2) / 108)
    assert leakage_bound(ident, 0.0).psnr_ceiling is None  # no noise: no finite ceiling


def test_randomized_floor_is_a_lower_estimate_of_the_complete_one() -> None:
    torch.manual_seed(0)
    net = build_model("lenet", InputSpec((1, 8, 8), 10))
    x, y = torch.rand(1, 1, 8, 8), torch.tensor([5])
    exact = leakage_bound(identifiability(net, x, y, "gram"), 0.01)
    partial = leakage_bound(identifiability(net, x, y, "randomized", top_k=16), 0.01)
    assert not partial.exact and partial.identifiable is None
    assert 0 < partial.mse_floor <= exact.mse_floor
    assert partial.psnr_ceiling >= exact.psnr_ceiling


def test_defence_noise_as_the_gradient_sees_it() -> None:
    assert dp_sgd_sigma(1.1, 1.0, 4) == pytest.approx(0.275)
    assert update_noise_sigma(0.01, 0.1, 2) == pytest.approx(0.05)
    assert psnr_ceiling(1e-4, 1.0) == pytest.approx(40.0)
    assert psnr_ceiling(1e-4, None) is None
    with pytest.raises(ValueError):
        dp_sgd_sigma(1.0, 1.0, 0)
    with pytest.raises(ValueError):
        leakage_bound(
            identifiability(NegativeLogit(mixing_matrix()).double(), torch.rand(1, 6), torch.tensor([0])), -1
        )
    torch.manual_seed(0)
    model = build_model("mlp", InputSpec((1, 8, 8), 10))
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    stds = weight_delta_rounding_std(model, grads, learning_rate=0.1)
    weight = model.layers[1].weight.detach().numpy()
    after = (model.layers[1].weight - 0.1 * grads["layers.1.weight"]).detach().numpy()
    # the stored weights, the subtraction and the scaling each round to half an ulp of their result
    delta = (weight - after).astype(np.float32)
    grad = (delta * np.float32(1 / 0.1)).astype(np.float32)
    stored = np.spacing(np.maximum(np.abs(weight), np.abs(after)).astype(np.float32)) / 0.1
    ulps = np.sqrt(stored**2 + (np.spacing(np.abs(delta)) / 0.1) ** 2 + np.spacing(np.abs(grad)) ** 2)
    np.testing.assert_allclose(stds["layers.1.weight"].numpy(), ulps / np.sqrt(12), rtol=1e-5)
    assert all(bool((s > 0).all()) for s in stds.values())
