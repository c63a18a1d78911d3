"""The noise-calibrated leakage bound: how well any unbiased attacker can reconstruct the input.

If the server observes the gradient h(x) plus Gaussian noise of standard deviation σ per
coordinate, the Fisher information of the input is I = JᵀJ / σ² (J from
`audits.security.identifiability`), and every unbiased reconstruction has

    E‖x̂ − x‖² ≥ tr(I⁻¹) = σ² Σ_i 1 / s_i²                     (Cramér–Rao)

(Hannun, Guo & van der Maaten, UAI 2021; Guo, Karrer, Chaudhuri & van der Maaten, ICML 2022;
Hayes, Mahloujifar & Balle, NeurIPS 2023). Divided by the number of inputs D it floors the
per-pixel MSE, and with the input's value range as peak it caps the PSNR.

* Rank-deficient J: directions J does not see admit no unbiased estimate at all, so the floor is
  the error on the identifiable subspace only, and the unidentifiable share is reported beside it.
* Non-uniform noise (float32 rounding of a weight delta, per-parameter noise): analyse the
  whitened Jacobian, `identifiability(noise_std=stds)`; σ is then a multiplier of those stds.
* Clipping: `identifiability(clip_norm=C)` differentiates the clipped gradient.
* The bound is local (first order at the true input) and for unbiased estimators: attacks with
  image priors or box constraints are biased and can beat it, which the benchmark counts.

The helpers below turn the defences into σ as the gradient sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attacks.base import ObservedUpdate
from audits.security.identifiability import Identifiability
from models.base import ZooModel

# Stds of float32 rounding below this fraction of their median are raised to it: a weight within
# about 1e-6 of its own scale from zero has a vanishing ulp, whose inverse would overflow the
# whitened float32 products (its coordinate still counts, as observed 1e6 times more precisely).
MIN_STD_FRACTION = 1e-6


@dataclass(frozen=True)
class LeakageBound:
    """The Cramér–Rao floor at one noise level.

    sigma: noise std per observed gradient coordinate (a multiplier of the given stds when J was
        whitened); source: where it comes from, e.g. "dp-sgd z=1 C=1 B=1".
    mse_floor: E‖x̂ − x‖² / D ≥ this for an unbiased x̂, counting the error on the identifiable
        subspace only; identifiable_mse_floor: the same per identifiable direction.
    psnr_ceiling: 10 log10(peak² / mse_floor); None when the floor is zero (no noise, nothing
        identifiable) or the input has no value range.
    unidentifiable: directions J does not see (its deficit), reported apart from the floor.
    exact: False when the spectrum was partial (randomized): then the floor is a lower estimate
        of the Cramér–Rao floor (see `basis`).
    """

    sigma: float
    source: str
    unknowns: int
    identifiable: int | None
    unidentifiable: int | None
    unidentifiable_fraction: float | None
    mse_floor: float
    identifiable_mse_floor: float | None
    psnr_ceiling: float | None
    peak: float | None
    exact: bool
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def leakage_bound(
    identifiability: Identifiability, sigma: float = 1.0, source: str = "", peak: float | None = 1.0
) -> LeakageBound:
    """The floor on per-input MSE and the PSNR ceiling at noise `sigma` (peak: the width of the
    input's value range, 1 for images in [0, 1]; None for inputs without one, e.g. embeddings)."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    ident = identifiability
    size = ident.unknowns
    values = ident.singular_values
    if ident.complete:
        kept = values[values > ident.tolerance]
        inverse_sum = float(np.sum(1.0 / kept**2)) if len(kept) else 0.0
        identifiable, basis = len(kept), "sigma^2 * sum 1/s_i^2 over the identified singular values"
    else:
        inverse_sum, basis = _partial_inverse_sum(ident)
        identifiable = None
    total = sigma**2 * inverse_sum
    unidentifiable = None if identifiable is None else size - identifiable
    mse_floor = total / size if size else 0.0
    return LeakageBound(
        sigma=float(sigma),
        source=source,
        unknowns=size,
        identifiable=identifiable,
        unidentifiable=unidentifiable,
        unidentifiable_fraction=None if unidentifiable is None else unidentifiable / size,
        mse_floor=mse_floor,
        identifiable_mse_floor=total / identifiable if identifiable else None,
        psnr_ceiling=psnr_ceiling(mse_floor, peak),
        peak=peak,
        exact=ident.complete,
        basis=basis,
    )


def psnr_ceiling(mse_floor: float, peak: float | None) -> float | None:
    """10 log10(peak² / mse_floor); None for a zero floor or no peak."""
    if peak is None or not mse_floor > 0:
        return None
    return float(10.0 * np.log10(peak**2 / mse_floor))


def _partial_inverse_sum(ident: Identifiability) -> tuple[float, str]:
    """A lower estimate of Σ 1/s_i² from the top k singular values: every input J does not
    structurally ignore (m = D − unseen) is taken as identifiable with s_i ≤ s_k for i > k, and
    Jensen's m² / ‖J‖_F² (the dFIL form of Hannun et al.) is used where it is larger."""
    values = ident.singular_values[ident.singular_values > 0]
    seen = ident.unknowns - ident.unseen_inputs
    if not len(values) or seen <= 0:
        return 0.0, "nothing identified"
    top = float(np.sum(1.0 / values**2)) + max(seen - len(values), 0) / float(values[-1]) ** 2
    jensen = seen**2 / ident.frobenius_sq if ident.frobenius_sq > 0 else 0.0
    basis = (
        f"sigma^2 * max(sum over the top {len(values)} of 1/s_i^2 + (m - k)/s_k^2, m^2/||J||_F^2) with "
        f"m = {seen} seen inputs: a lower estimate (Ritz values, Hutchinson trace), rank assumed m"
    )
    return max(top, jensen), basis


# --- noise of the defences, as the gradient sees it --------------------------------------------


def dp_sgd_sigma(noise_multiplier: float, clipping_norm: float, batch_size: int) -> float:
    """DP-SGD adds N(0, (z·C)²) to the sum of B clipped per-sample gradients, so the batch-mean
    gradient a step uses carries σ = z·C / B (analyse J with `clip_norm=C`)."""
    if batch_size < 1 or noise_multiplier < 0 or clipping_norm <= 0:
        raise ValueError("need batch_size >= 1, noise_multiplier >= 0 and clipping_norm > 0")
    return noise_multiplier * clipping_norm / batch_size


def update_noise_sigma(noise_std: float, learning_rate: float, local_steps: int = 1) -> float:
    """The `gaussian` defence adds N(0, std²) to the weight delta; the gradient the server
    derives from it (Δw / (lr · steps)) carries std / (lr · steps)."""
    if noise_std < 0 or learning_rate <= 0 or local_steps < 1:
        raise ValueError("need noise_std >= 0, learning_rate > 0 and local_steps >= 1")
    return noise_std / (learning_rate * local_steps)


def weight_delta_rounding_std(
    model: ZooModel, gradients: Mapping[str, Tensor], learning_rate: float, local_steps: int = 1
) -> dict[str, Tensor]:
    """Per-parameter std of the gradient a server derives from a float32 weight delta after
    `local_steps` SGD steps along `gradients` at `learning_rate`: the rounding of the stored
    weights, of their difference and of its scaling (ulp / √12 each, as
    `ObservedUpdate.from_weight_delta` models it), as seen in the gradient.
    Stds below MIN_STD_FRACTION of their median are raised to it."""
    if learning_rate <= 0 or local_steps < 1:
        raise ValueError("need learning_rate > 0 and local_steps >= 1")
    before = {n: p.detach().float() for n, p in model.named_parameters()}
    after = {
        n: (w - learning_rate * local_steps * gradients[n].detach().float()) if n in gradients else w
        for n, w in before.items()
    }
    observed = ObservedUpdate.from_weight_delta(
        model, before, after, learning_rate, local_steps, tuple(model.spec.shape), model.spec.num_classes
    )
    stds = observed.gradient_noise or {}
    floor = MIN_STD_FRACTION * float(torch.cat([s.reshape(-1) for s in stds.values()]).median())
    return {n: s.clamp(min=floor) for n, s in stds.items()}
