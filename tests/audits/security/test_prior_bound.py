"""Van Trees' bound: attained by the posterior mean where the model is linear and the data
Gaussian, equal to the prior's error where the gradient carries nothing, never above it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audits.security.identifiability import fisher_gram, observed_jacobian
from audits.security.prior_bound import PriorBounds, data_prior_covariance
from tests.support.bound_models import SINGULAR, NegativeLogit, mixing_matrix


def _prior(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return np.full(size, 0.5), basis @ np.diag(np.geomspace(0.3, 0.002, size)) @ basis.T


def test_the_posterior_mean_attains_the_bound_for_a_linear_gradient_and_gaussian_data() -> None:
    """x ~ N(μ, Σ_p), g = −A x + N(0, σ²): the posterior mean is the MMSE estimator, and its error
    is exactly tr((AᵀA/σ² + Σ_p⁻¹)⁻¹), which the bound must give to within sampling error."""
    mixing = mixing_matrix()
    torch.manual_seed(0)
    model = NegativeLogit(mixing).double()
    mean, prior = _prior(6)
    x0, y, sigma = torch.from_numpy(mean[None]), torch.tensor([1]), 0.05
    gram = fisher_gram(model, x0, y)
    jac = observed_jacobian(model, x0, y).numpy()
    np.testing.assert_allclose(gram, jac.T @ jac, atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(gram)[::-1], SINGULAR**2, rtol=1e-6)  # A stored in float32
    bound = PriorBounds(gram, prior).at(sigma)
    a = -mixing.numpy()
    rng = np.random.default_rng(3)
    draws = 20000
    xs = rng.multivariate_normal(mean, prior, size=draws)
    observed = xs @ a.T + sigma * rng.standard_normal((draws, 9))
    gain = prior @ a.T @ np.linalg.inv(a @ prior @ a.T + sigma**2 * np.eye(9))
    estimates = mean + (observed - mean @ a.T) @ gain.T
    measured = float(np.mean(np.sum((estimates - xs) ** 2, axis=1))) / 6
    assert measured == pytest.approx(bound.mse_floor, rel=0.05)
    assert bound.mse_floor < bound.prior_mse


def test_without_information_the_floor_is_the_prior_error_and_more_noise_never_lowers_it() -> None:
    _, prior = _prior(5)
    bounds = PriorBounds(np.zeros((5, 5)), prior)
    assert bounds.at(1.0).mse_floor == pytest.approx(np.trace(prior) / 5, rel=1e-12)
    rng = np.random.default_rng(4)
    jac = rng.standard_normal((7, 5))
    floors = [b.mse_floor for b in PriorBounds(jac.T @ jac, prior).over([1e-3, 1e-2, 1e-1, 1, 10])]
    assert floors == sorted(floors) and floors[-1] <= bounds.prior_mse
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        bounds.at(0.0)


def test_data_prior_covariance_is_invertible_with_fewer_samples_than_inputs() -> None:
    samples = np.random.default_rng(5).random((20, 3, 4, 4))
    covariance = data_prior_covariance(samples)
    assert covariance.shape == (48, 48)
    assert np.linalg.eigvalsh(covariance).min() > 0
    assert np.trace(covariance) / 48 == pytest.approx(samples.reshape(20, -1).var(axis=0).mean(), rel=0.2)
