"""The leakage bound for attackers with a prior: Van Trees' Bayesian Cramér–Rao inequality.

The Cramér–Rao ceiling (`audits.security.leakage_bound`) holds for unbiased reconstructions only, and
attacks are not unbiased: Inverting Gradients' total variation, DLG's box and any learned image
model pull towards natural images, and measured they beat that ceiling in 9 of 24 cases. For
every estimator, biased ones included, Van Trees' inequality bounds the error averaged over a
prior p(x) instead (Van Trees 1968; Gill & Levit 1995):

    E‖x̂ − x‖² ≥ tr((E[I(x)] + I_prior)⁻¹),   I(x) = JᵀJ / σ²,   I_prior = Σ_p⁻¹ (Gaussian prior).

Here the prior is the dataset's own: a Gaussian with its pixel covariance (Ledoit–Wolf shrunk,
so it is invertible with fewer samples than pixels), and E[I(x)] is taken at the audited sample
(the same first-order, local view as the Cramér–Rao ceiling). Directions the gradient does not
see now cost their prior variance instead of being reported apart, and a huge noise gives the
prior's own error rather than a ceiling below 0 dB: the bound says what the gradient adds to
what the attacker already knows about the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from audits.security.leakage_bound import psnr_ceiling


@dataclass(frozen=True)
class PriorBound:
    """The Van Trees floor at one noise level.

    prior_mse: tr(Σ_p) / D, the per-input error of guessing from the prior alone (the floor
        when the gradient carries nothing); mse_floor: the floor with the gradient;
    psnr_ceiling: 10 log10(peak² / mse_floor), which no reconstruction beats on average over
        data drawn from the prior.
    """

    sigma: float
    source: str
    unknowns: int
    prior_mse: float
    mse_floor: float
    psnr_ceiling: float | None
    peak: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_prior_covariance(samples: np.ndarray) -> np.ndarray:
    """Σ_p of flattened `samples` (N, ...), Ledoit–Wolf shrunk towards a scaled identity."""
    flat = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    if len(flat) < 2:
        raise ValueError(f"a prior covariance needs at least 2 samples, got {len(flat)}")
    return LedoitWolf(assume_centered=False).fit(flat).covariance_


class PriorBounds:
    """Van Trees floors of one Fisher Gram under one prior, for any number of noise levels: the
    prior's Cholesky factor L and the eigenvectors of LᵀGL are computed once, after which

        tr((G/σ² + Σ_p⁻¹)⁻¹) = tr(L (I + LᵀGL/σ²)⁻¹ Lᵀ) = Σ_i ‖L q_i‖² / (1 + λ_i/σ²)

    is a sum per σ."""

    def __init__(self, gram: np.ndarray, prior_covariance: np.ndarray) -> None:
        size = len(gram)
        if gram.shape != (size, size) or prior_covariance.shape != (size, size):
            raise ValueError(
                f"the Gram {gram.shape} and the prior covariance {prior_covariance.shape} must both "
                "be D x D over the same inputs"
            )
        factor = np.linalg.cholesky(prior_covariance)
        eigenvalues, vectors = np.linalg.eigh(factor.T @ gram @ factor)
        self.unknowns = size
        self.eigenvalues = np.clip(eigenvalues, 0.0, None)
        self.weights = ((factor @ vectors) ** 2).sum(axis=0)  # ‖L q_i‖²
        self.prior_mse = float(np.trace(prior_covariance)) / size

    def at(self, sigma: float, source: str = "", peak: float | None = 1.0) -> PriorBound:
        """The floor and PSNR ceiling at noise std `sigma` per observed gradient coordinate."""
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        total = float(np.sum(self.weights / (1.0 + self.eigenvalues / sigma**2)))
        floor = total / self.unknowns
        return PriorBound(
            sigma=float(sigma),
            source=source,
            unknowns=self.unknowns,
            prior_mse=self.prior_mse,
            mse_floor=floor,
            psnr_ceiling=psnr_ceiling(floor, peak),
            peak=peak,
        )

    def over(self, sigmas: Sequence[float], peak: float | None = 1.0) -> list[PriorBound]:
        return [self.at(sigma, peak=peak) for sigma in sigmas]
