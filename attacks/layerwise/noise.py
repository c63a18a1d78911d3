"""Noise-aware pieces of layer-wise inversion: error propagation, sign repair, consistency checks.

A federated server sees float32 weights before and after a step, so the gradient it derives
carries a known noise (`ObservedUpdate.gradient_noise`, std sigma per dL/dW entry). The layer
walk propagates what that noise does, layer by layer:

* each layer is solved by generalised least squares (`attacks.layerwise.systems.build_system`,
  `solve_gradient_only`): gradient equations weighted by 1 / sigma^2, weight constraints by
  1 / tau^2, where tau is the predicted error of z;
* the solve's inverse normal matrix is the error covariance of the layer's input, whose
  diagonal (`LayerSolve.variance`) becomes, through the inverse activation, the tau of the
  layer below (`pull_back_variance`);
* a LeakyReLU derivative sign is in doubt where |z| is within a few predicted stds of zero;
  `sign_flips` tests those entries with the solve's own normal matrix (`flip_statistics`);
* a gradient-only solve ignores the weight constraints; `weight_consistency` says whether its
  weight residual is what the noise explains, and the attack falls back to the stacked solve
  when it is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import nn
from torch.nn import functional as F

from attacks.layerwise.systems import (
    ConvGeometry,
    RankInfo,
    Resolver,
    activation_derivative,
    apply_gradient,
    apply_weight,
    backprop_input,
    gradient_block,
    inverse_variance,
    invert_activation,
    patch_positions,
)


@dataclass
class LayerSolve:
    """One least-squares solve of a layer and what is needed to reason about its errors.

    gradient_weights: weight of each dL/dW equation in gradient-block row order
        (C_out * kh * kw, C_in), or a scalar (alpha^2 of the unweighted stacked system, 1 for an
        unweighted gradient-only solve).
    row_weights: weight of each weight-constraint row (scalar 1 when unweighted); None when the
        weight constraints are not part of the solve (gradient-only).
    inverse: applies the inverse normal matrix to (n,) or (n, m) arrays.
    variance: predicted error variance of each unknown (only with a noise model).
    resolver: cheap re-solve after a few entries of k changed (stacked, Cholesky only).
    """

    x: np.ndarray
    info: RankInfo
    gradient_weights: np.ndarray | float
    row_weights: np.ndarray | float | None
    inverse: Callable[[np.ndarray], np.ndarray] | None
    variance: np.ndarray | None = None
    resolver: Resolver | None = None


# ---------------------------------------------------------------------------------------------
# Error propagation
# ---------------------------------------------------------------------------------------------


def head_input_variance(
    k: np.ndarray,
    grad_sigma: np.ndarray,
    x: np.ndarray | None = None,
    bias_sigma: np.ndarray | None = None,
) -> np.ndarray:
    """Error variance of x = dL/dW^T k / |k|^2 (a head, or any Linear layer whose k is observed as
    its bias gradient), to first order: sum_o k_o^2 sigma_oi^2 / |k|^4 from the noise of dL/dW,
    plus x_i^2 sum_o k_o^2 sigma_b,o^2 / |k|^4 from the noise of k (given `x` and `bias_sigma`).
    The second term is one common rescaling of x, harmless below a bias-free positively
    homogeneous net but not against the next layer's bias; counted per entry (diagonal)."""
    k = np.asarray(k, dtype=np.float64).ravel()
    s2 = np.asarray(grad_sigma, dtype=np.float64).reshape(k.size, -1) ** 2
    norm4 = float(k @ k) ** 2
    variance = (k**2) @ s2 / norm4
    if x is not None and bias_sigma is not None:
        scale = float((k**2) @ (np.asarray(bias_sigma, dtype=np.float64).ravel() ** 2)) / norm4
        variance = variance + np.ravel(x) ** 2 * scale
    return variance


def head_noise_ratio(grad_w: np.ndarray, k: np.ndarray, x: np.ndarray, grad_sigma: np.ndarray) -> float:
    """Weighted residual of the head's best rank-1 fit dL/dW = k x^T over its expected value (one
    per equation beyond the unknowns). About 1 when `gradient_noise` is all the noise there is;
    far above when the update carries noise the model does not know of (a Gaussian defence,
    clipping, several local steps), and then the model must not be trusted. Both factors are
    fitted (weighted alternating least squares from k, x), since k, the bias gradient, is
    observed with noise too and its error times x would otherwise count as unexplained."""
    g = np.asarray(grad_w, dtype=np.float64).reshape(np.size(k), -1)
    w = inverse_variance(grad_sigma).reshape(g.shape)
    u, v = np.ravel(k).astype(np.float64), np.ravel(x).astype(np.float64)
    for _ in range(5):
        v = (w * g).T @ u / np.maximum(w.T @ u**2, 1e-300)
        u = (w * g) @ v / np.maximum(w @ v**2, 1e-300)
    r = float(np.sum(w * (g - np.outer(u, v)) ** 2))
    return r / max(g.size - u.size - v.size + 1, 1)


def pull_back_variance(
    ops: tuple[tuple[int, nn.Module, tuple[int, ...]], ...], y: np.ndarray, variance: np.ndarray
) -> np.ndarray:
    """Error variance of z = sigma^{-1}(y) to first order: var(y) / sigma'(z)^2 through every
    activation (reshapes only reshape). Saturated tanh / sigmoid entries get a huge variance,
    i.e. almost no weight: their inverse carries little information."""
    var = np.asarray(variance, dtype=np.float64)
    for _, op, in_shape in reversed(ops):
        y = np.reshape(y, in_shape)
        var = np.reshape(var, in_shape)
        if not isinstance(op, nn.Flatten):
            y = invert_activation(op, y)
            slope = activation_derivative(op, y)
            var = var / np.maximum(slope**2, 1e-300)
    return var


# Below this many unknowns the exact diagonal of the inverse normal matrix is cheap.
EXACT_VARIANCE_SIZE = 400


def solve_variance(
    inverse: Callable[[np.ndarray], np.ndarray], geom: ConvGeometry, probes: int = 8, seed: int = 0
) -> np.ndarray:
    """Error variance of each unknown, diag(N^-1) of a noise-weighted solve: exact for small
    systems, else Hutchinson's estimator (mean of v * N^-1 v over Rademacher probes v) averaged
    per input channel - the layer below needs the level, and the exact diagonal of a large
    system would cost as much as its factorisation."""
    n = geom.unknowns
    if n <= EXACT_VARIANCE_SIZE:
        return np.maximum(np.diag(inverse(np.eye(n))), 0.0)
    v = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n, probes))
    est = (v * inverse(v)).mean(axis=1)
    per_channel = est.reshape(geom.in_channels, geom.pixels).mean(axis=1)
    # a channel's estimate is a mean of thousands of samples, but never let one come out at or
    # below zero (it would make the layer below treat those constraints as exact)
    per_channel = np.maximum(per_channel, 1e-3 * max(float(per_channel.mean()), 1e-300))
    return np.repeat(per_channel, geom.pixels)


# ---------------------------------------------------------------------------------------------
# Residuals and the objective a solve minimises
# ---------------------------------------------------------------------------------------------


def _as_weight_layout(geom: ConvGeometry, weights: np.ndarray | float) -> np.ndarray | float:
    """Gradient-block row order (C_out * A, C_in) -> dL/dW order (C_out, C_in, A)."""
    if np.isscalar(weights):
        return float(weights)
    w = np.asarray(weights).reshape(geom.out_channels, geom.offsets, geom.in_channels)
    return w.transpose(0, 2, 1)


def gradient_residual(
    geom: ConvGeometry, weight_shape: tuple[int, ...], k: np.ndarray, grad: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """dL/dW - K(k) x, shaped (C_out, C_in, kh * kw)."""
    r = np.ravel(grad) - apply_gradient(geom, weight_shape, k, x).ravel()
    return r.reshape(geom.out_channels, geom.in_channels, geom.offsets)


def objective(
    geom: ConvGeometry,
    weight: np.ndarray,
    solve: LayerSolve,
    k: np.ndarray,
    grad: np.ndarray,
    z: np.ndarray,
    x: np.ndarray,
) -> float:
    """The weighted sum of squared residuals that `solve` minimises (its weights, this x and k)."""
    r = gradient_residual(geom, tuple(weight.shape), k, grad, x)
    total = float(np.sum(_as_weight_layout(geom, solve.gradient_weights) * r**2))
    if solve.row_weights is not None:
        rw = apply_weight(geom, weight, x) - np.ravel(z)
        total += float(np.sum(solve.row_weights * rw**2))
    return total


def degrees_of_freedom(geom: ConvGeometry, weight: np.ndarray, solve: LayerSolve) -> int:
    """Equations minus unknowns of a solve: the expected value of its objective when every
    equation's weight is its inverse noise variance (chi-square), what a residual is judged by."""
    equations = int(np.size(weight)) + (geom.out_size if solve.row_weights is not None else 0)
    return max(equations - solve.info.rank, 1)


# ---------------------------------------------------------------------------------------------
# Derivative signs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlipStatistics:
    """Linearised effect of changing k at candidate entries, with x re-solved.

    Changing k_j (j = output channel o, position p) by d adds d * P_j x to K x, where P_j x is the
    input patch position p sees, placed in row o of dL/dW. With a_j its weighted column, the
    re-solved objective changes by -2 d num_j + d^2 M_jj, where num_j = a_j^T r and
    M = A_S^T A_S - U^T N^{-1} U (U = A^T A_S, N = A^T A) is the Schur complement: the part of
    a_j the solve cannot absorb by moving x. Using |a_j|^2 instead (x held fixed) understates
    the gain of a real flip whenever the solve has already bent x to fit the wrong k.
    """

    entries: np.ndarray  # flat indices into k
    num: np.ndarray
    schur: np.ndarray  # M, (S, S)
    moves: np.ndarray  # N^-1 U, (n, S): x moves by -moves[:, j] * d when k_j changes by d
    patch_norms: np.ndarray  # |a_j|^2, the diagonal of M before the solve absorbs anything


def flip_statistics(
    geom: ConvGeometry,
    k: np.ndarray,
    x: np.ndarray,
    residual: np.ndarray,
    solve: LayerSolve,
    entries: np.ndarray,
) -> FlipStatistics:
    """`FlipStatistics` for the candidate `entries` of k (see its docstring); one application of
    the solve's inverse normal matrix to |entries| columns."""
    n_in, a_count = geom.in_channels, geom.offsets
    wg = _as_weight_layout(geom, solve.gradient_weights)
    wg = np.broadcast_to(wg, residual.shape)
    out_ch, pos = np.divmod(entries, geom.out_pixels)
    positions = patch_positions(geom)[:, pos]  # (A, S)
    valid = positions >= 0
    xs = np.asarray(x, dtype=np.float64).reshape(n_in, geom.pixels)
    patches = np.where(valid[None], xs[:, np.where(valid, positions, 0)], 0.0)  # (C_in, A, S)
    patches = patches.transpose(2, 0, 1)  # (S, C_in, A)
    weighted = wg[out_ch] * patches  # (S, C_in, A)
    num = np.einsum("sca,sca->s", weighted, residual[out_ch])
    same = out_ch[:, None] == out_ch[None, :]
    gram = np.einsum("sca,tca->st", weighted, patches) * same
    kblock = gradient_block(geom, k).reshape(geom.out_channels, a_count, geom.pixels)
    u = np.einsum("sca,sap->scp", weighted, kblock[out_ch]).reshape(entries.size, -1).T  # (n, S)
    moves = solve.inverse(u)
    schur = gram - u.T @ moves
    return FlipStatistics(entries, num, 0.5 * (schur + schur.T), moves, np.diag(gram).copy())


# A change of k that the solve absorbs almost entirely by moving x (M_jj below this fraction of
# |a_j|^2) is not identifiable from the residual; with strongly varying noise weights M_jj is
# then also lost to cancellation, so such entries are never flipped.
MIN_IDENTIFIABLE = 1e-6


def choose_flips(
    stats: FlipStatistics,
    delta: np.ndarray,
    scale: float,
    kappa: float,
    limit: int,
    prior_cost: np.ndarray | None = None,
) -> np.ndarray:
    """Local search on the linearised model: repeatedly toggle the entry (flip it, or undo a
    flip taken earlier in this search) that lowers the re-solved objective most, provided the
    fitted change points the toggle's way by more than `kappa` standard errors
    (scale * sqrt(M_jj)) and the drop in the objective, as a log-likelihood ratio
    (drop / (2 scale^2)), beats the prior cost of the toggle (`prior_cost[j]`: log-odds of the
    sign the reconstruction above gives against the other; 0 without a noise model). Nearby
    entries are confounded (M is far from diagonal), which is why a flip can be undone.
    Returns the positions into `stats.entries` of the entries that end up toggled."""
    num = stats.num.copy()
    diag = np.diag(stats.schur)
    identifiable = diag > MIN_IDENTIFIABLE * stats.patch_norms
    diag = np.maximum(diag, 1e-300)
    cost = np.zeros(num.size) if prior_cost is None else np.asarray(prior_cost, dtype=np.float64)
    toggled = np.zeros(num.size, dtype=bool)
    for _ in range(2 * min(limit, num.size)):
        step = np.where(toggled, -delta, delta)
        drop = step * (2 * num - step * diag)
        score = np.sign(step) * num / (scale * np.sqrt(diag))
        penalty = np.where(toggled, -cost, cost)
        ok = identifiable & (drop > 0) & (score > kappa) & (drop / (2 * scale**2) > penalty)
        if not ok.any():
            break
        j = int(np.flatnonzero(ok)[np.argmax((drop - 2 * scale**2 * penalty)[ok])])
        toggled[j] = ~toggled[j]
        num -= stats.schur[:, j] * step[j]
    return np.flatnonzero(toggled)


def sign_log_odds(pre: np.ndarray, pre_variance: np.ndarray | None, state: np.ndarray) -> np.ndarray | None:
    """Prior cost of moving each entry away from `state`: log P(state) - log P(other), with
    P(z > 0) = Phi(z_hat / std) from the predicted error; None without a noise model."""
    if pre_variance is None:
        return None
    ratio = np.ravel(pre) / np.sqrt(np.maximum(np.ravel(pre_variance), 1e-300))
    log_pos, log_neg = special.log_ndtr(ratio), special.log_ndtr(-ratio)
    return np.where(np.ravel(state), log_pos - log_neg, log_neg - log_pos)


def sign_candidates(
    pre: np.ndarray,
    pre_variance: np.ndarray | None,
    window: float,
    band: float,
    limit: int,
    impact: np.ndarray | None = None,
) -> np.ndarray:
    """Entries whose derivative sign is in doubt, at most `limit`, the ones that matter first.

    With a predicted error variance of the pre-activations: |z| <= band * std (the sign is
    within `band` standard deviations of flipping), ranked by the expected damage of a wrong
    sign, P(wrong) * `impact` (P from the normal error model; impact: what a flip would change
    in the objective, `flip_impact`) - near-zero pre-activations on near-zero inputs (dark
    image regions) are numerous but harmless, and must not crowd out the few that matter.
    Without a noise model: |z| <= window * rms(z), smallest |z| first."""
    pre = np.ravel(pre)
    if pre_variance is not None:
        sd = np.sqrt(np.maximum(np.ravel(pre_variance), 1e-300))
        ratio = np.abs(pre) / sd
        cand = np.flatnonzero(ratio <= band)
        if impact is not None:
            damage = special.ndtr(-ratio[cand]) * np.ravel(impact)[cand]
            return cand[np.argsort(-damage, kind="stable")][:limit]
    else:
        rms = float(np.sqrt(np.mean(pre**2))) or 1.0
        ratio = np.abs(pre) / rms
        cand = np.flatnonzero(ratio <= window)
    return cand[np.argsort(ratio[cand], kind="stable")][:limit]


def flip_impact(geom: ConvGeometry, x: np.ndarray, solve: LayerSolve, delta: np.ndarray) -> np.ndarray:
    """delta_j^2 |a_j|^2 for every entry j of k: how much changing k_j by delta_j would move the
    weighted gradient residual (x held fixed; an upper bound on the re-solved change)."""
    if geom.is_linear:
        wg = np.broadcast_to(
            _as_weight_layout(geom, solve.gradient_weights), (geom.out_channels, geom.in_channels, 1)
        )
        energy = wg[:, :, 0] @ (np.ravel(x) ** 2)
    else:
        wg = np.broadcast_to(
            _as_weight_layout(geom, solve.gradient_weights),
            (geom.out_channels, geom.in_channels, geom.offsets),
        )
        kernel = torch.from_numpy(
            np.ascontiguousarray(wg).reshape(geom.out_channels, geom.in_channels, *geom.kernel)
        )
        x2 = torch.from_numpy(np.ravel(x).reshape(1, geom.in_channels, geom.height, geom.width) ** 2)
        energy = F.conv2d(x2, kernel, stride=geom.stride, padding=geom.padding).numpy()
    return np.ravel(delta) ** 2 * np.ravel(energy)


def robust_scale(geom: ConvGeometry, residual: np.ndarray, solve: LayerSolve) -> float:
    """Robust std of the weighted gradient residual (1.4826 x median |r| sqrt(w)): about 1 when
    the noise model is right, whatever it is when the weights are only relative."""
    wg = np.broadcast_to(_as_weight_layout(geom, solve.gradient_weights), residual.shape)
    scale = 1.4826 * float(np.median(np.abs(residual) * np.sqrt(wg)))
    return scale if scale > 0 else 1e-300


# ---------------------------------------------------------------------------------------------
# Is a gradient-only solve consistent with the weight constraints?
# ---------------------------------------------------------------------------------------------


def weight_consistency(
    geom: ConvGeometry,
    weight: np.ndarray,
    solve: LayerSolve,
    z: np.ndarray,
    z_variance: np.ndarray,
    probes: int = 8,
    seed: int = 0,
) -> float:
    """Observed over expected weighted weight residual of a gradient-only solution.

    With T = diag(var z) and C = the solve's error covariance (its inverse normal matrix), the
    residual z - W x has expected weighted square E = m + tr(T^-1 W C W^T) when both error
    sources are as predicted (the second term by Hutchinson's estimator). A ratio far above 1
    means the gradient-only solution contradicts the weight constraints by more than the noise
    explains (typically a wrong k: a derivative sign the repair missed).
    """
    assert solve.inverse is not None
    tau2 = np.maximum(np.ravel(z_variance), 1e-300)
    rw = np.ravel(z) - apply_weight(geom, weight, solve.x)
    observed = float(np.sum(rw**2 / tau2))
    u = np.random.default_rng(seed).choice((-1.0, 1.0), size=(probes, geom.out_size))
    trace = 0.0
    for v in u:
        back = backprop_input(geom, weight, v / np.sqrt(tau2))
        trace += float(v @ (apply_weight(geom, weight, solve.inverse(back)) / np.sqrt(tau2)))
    expected = geom.out_size + max(trace / probes, 0.0)
    return observed / expected
