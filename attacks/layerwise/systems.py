"""Per-layer linear systems of layer-wise gradient inversion (R-GAP / COPA), built from structure.

For batch size 1, a conv (or linear) layer with input x, weight W and output-gradient k obeys

    gradient constraints  K x = vec(dL/dW)     (dL/dW[o,c,u,v] = sum_pos k[o,pos] x_c[shifted pos])
    weight constraints    W x = z - b          (z: the pre-activation output, b: the bias)
    padding constraints   P x_padded = 0       (zero padding is known)

R-GAP builds these as dense Toeplitz matrices on the padded input and calls lstsq, which takes
minutes per image. Here the padding constraints are eliminated exactly (the unknowns are the
interior pixels; each padded pixel adds one to the rank of [K; W; P]) and the normal matrix
A^T A of the weighted interior system A = [alpha K; W] is assembled from its structure:

* K is block-diagonal with the same block for every input channel, so K^T K = I (x) Q with
  Q = Kblk^T Kblk of size (H*W)^2;
* W^T W is a sum, over pairs of kernel offsets (a, b), of the (C_in x C_in) matrix
  w[:, :, a]^T w[:, :, b] placed at the pixel pairs that one output position sees through a and b.

A Linear layer is the special case of a 1x1 conv on a 1x1 image with C_in = in_features. When
only some weight constraints are known (a ReLU above hides the rows at zero), `weight_rows`
masks them: W^T D W is assembled from the same offset pairs, weighted per output position.
Other layers and other constraints (pooling) use `attacks.layerwise.generic_systems` (autograd).
The normal matrix is factorised in float64: Cholesky plus Lanczos estimates of the extreme
eigenvalues certify full rank; otherwise a pivoted Cholesky gives the numerical rank. The attack
and `audits.security.metric` both use this module, so they report the same ranks.

When the gradient block alone has full column rank and is well conditioned (the deeper CNN6
convs, every FC layer), `solve_gradient_only` solves one small (H*W)^2 system shared by all
input channels instead - what R-GAP does for FC layers - and the weight constraints serve as a
check (their residual is reported).

With known noise both accept per-equation standard deviations (generalised least squares,
`build_system(gradient_sigma=, weight_sigma=)`): the gradient block then differs per input
channel but stays block-diagonal, and W^T W gains a weight per output entry
(`weighted_weight_gram`); the inverse normal matrix is then the error covariance of x.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.linalg as sla
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.nn import functional as F

from attacks.base import AttackError

# Relative tolerance on singular values of the weighted interior system A = [alpha K; W]:
# sigma_i counts towards the rank when sigma_i > RANK_RTOL * sigma_max (i.e. lambda_i > 1e-10 *
# lambda_max on A^T A). A^T A holds sigma^2 with absolute error of order eps * sigma_max^2, so
# exactly-null directions show up near 1e-8 * sigma_max (measured: <= 1.5e-8 on CNN6-d layer 1),
# while genuine singular values of CNN6 / CNN6-d are >= 1e-2 * sigma_max; 1e-5 sits in the gap.
RANK_RTOL = 1e-5

# Clipping before inverting saturating activations (COPA clips tanh inputs to +-0.9999).
TANH_CLIP = 0.9999
SIGMOID_CLIP = 1e-4

# A layer is solved from its gradient constraints alone when their per-channel block has
# sigma_min / sigma_max above this (CNN6's deeper convs: 0.18-0.58; the stacked systems of its
# first two convs: about 0.02). Below it, or when rank-deficient, the stacked system is solved.
GRADIENT_ONLY_RATIO = 1e-2


# BLAS threads while solving. Measured on the 2-core dev machine (CNN6, 32x32): one thread takes
# 0.9-1.2 s, two take 0.8-1.3 s (the Lanczos solves are memory-bound), but when the other core is
# busy OpenBLAS's spinning threads make two take 5-10 s. None leaves the process setting alone.
DEFAULT_BLAS_THREADS = 1


@contextmanager
def blas_threads(limit: int | None) -> Iterator[None]:
    """Temporarily limit BLAS threads (restored on exit); a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limit = None
    if limit is None:
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Shape facts of one conv layer; a Linear layer is a 1x1 conv on a 1x1 image."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    is_linear: bool = False

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def out_pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def offsets(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def unknowns(self) -> int:
        """Interior unknowns (what is actually solved for)."""
        return self.in_channels * self.pixels

    @property
    def padded_unknowns(self) -> int:
        """Unknowns of R-GAP's system on the zero-padded input (what R-GAP and COPA report)."""
        padded = (self.height + 2 * self.padding[0]) * (self.width + 2 * self.padding[1])
        return self.in_channels * padded

    @property
    def padding_unknowns(self) -> int:
        return self.padded_unknowns - self.unknowns

    @property
    def out_size(self) -> int:
        return self.out_channels * self.out_pixels

    @property
    def weight_count(self) -> int:
        return self.out_channels * self.in_channels * self.offsets


def _conv_padding(module: nn.Conv2d, index: int) -> tuple[int, int]:
    padding = module.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if any(k % 2 == 0 for k in module.kernel_size):
            raise AttackError(
                f"layer {index} (Conv2d) uses asymmetric 'same' padding; only symmetric padding is supported"
            )
        return (module.kernel_size[0] // 2, module.kernel_size[1] // 2)
    return (int(padding[0]), int(padding[1]))


def geometry_of(module: nn.Module, in_shape: tuple[int, ...], index: int) -> ConvGeometry:
    """Geometry of a Linear or Conv2d layer seen on inputs of shape `in_shape` (no batch dim)."""
    if isinstance(module, nn.Linear):
        return ConvGeometry(module.in_features, module.out_features, 1, 1, (1, 1), (1, 1), (0, 0), True)
    if not isinstance(module, nn.Conv2d):
        raise AttackError(f"layer {index} ({type(module).__name__}) is not a Linear or Conv2d layer")
    if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros":
        raise AttackError(
            f"layer {index} (Conv2d) uses groups/dilation/non-zero padding; layer-wise inversion supports "
            "plain convs only (use an optimisation attack)"
        )
    if len(in_shape) != 3:
        raise AttackError(f"layer {index} (Conv2d) expects (C, H, W) inputs, got shape {in_shape}")
    return ConvGeometry(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        height=in_shape[1],
        width=in_shape[2],
        kernel=(int(module.kernel_size[0]), int(module.kernel_size[1])),
        stride=(int(module.stride[0]), int(module.stride[1])),
        padding=_conv_padding(module, index),
    )


@lru_cache(maxsize=64)
def offset_maps(geom: ConvGeometry) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """For each kernel offset a = (u, v): the output positions that see an interior pixel through
    a, and which interior pixel (flat indices). Within one offset the map is injective."""
    oh, ow = geom.out_height, geom.out_width
    rows = np.arange(oh)[:, None]
    cols = np.arange(ow)[None, :]
    maps = []
    for u in range(geom.kernel[0]):
        for v in range(geom.kernel[1]):
            y = geom.stride[0] * rows + u - geom.padding[0]
            x = geom.stride[1] * cols + v - geom.padding[1]
            valid = (y >= 0) & (y < geom.height) & (x >= 0) & (x < geom.width)
            valid = np.broadcast_to(valid, (oh, ow))
            out_idx = (rows * ow + cols)[valid]
            in_idx = np.broadcast_to(y * geom.width + x, (oh, ow))[valid]
            maps.append((out_idx, in_idx))
    return tuple(maps)


# ---------------------------------------------------------------------------------------------
# The system
# ---------------------------------------------------------------------------------------------


def gradient_block(geom: ConvGeometry, k: np.ndarray) -> np.ndarray:
    """Kblk, shape (C_out * kh * kw, H * W): the gradient constraints of one input channel."""
    k = k.reshape(geom.out_channels, geom.out_pixels)
    block = np.zeros((geom.out_channels, geom.offsets, geom.pixels))
    for a, (out_idx, in_idx) in enumerate(offset_maps(geom)):
        block[:, a, in_idx] = k[:, out_idx]
    return block.reshape(geom.out_channels * geom.offsets, geom.pixels)


def patch_positions(geom: ConvGeometry) -> np.ndarray:
    """(kh * kw, out_pixels): the interior pixel each output position sees through each kernel
    offset, -1 where it sees padding."""
    positions = np.full((geom.offsets, geom.out_pixels), -1)
    for a, (out_idx, in_idx) in enumerate(offset_maps(geom)):
        positions[a, out_idx] = in_idx
    return positions


def weight_gram(geom: ConvGeometry, weight: np.ndarray) -> np.ndarray:
    """W^T W on the interior unknowns, assembled from kernel-offset pairs (see module doc)."""
    n_in = geom.in_channels
    w = weight.reshape(geom.out_channels, n_in, geom.offsets)
    if geom.is_linear:
        flat = w[:, :, 0]
        return flat.T @ flat
    gram = np.zeros((geom.pixels, geom.pixels, n_in, n_in))
    pair = np.einsum("oca,odb->abcd", w, w, optimize=True)  # (A, A, C_in, C_in)
    positions = patch_positions(geom)
    for a in range(geom.offsets):
        for b in range(geom.offsets):
            both = (positions[a] >= 0) & (positions[b] >= 0)
            gram[positions[a, both], positions[b, both]] += pair[a, b]
    return gram.transpose(2, 0, 3, 1).reshape(geom.unknowns, geom.unknowns)


@dataclass(frozen=True)
class RankInfo:
    """Numerical rank of the interior system and its extreme singular values."""

    rank: int
    unknowns: int
    sigma_min: float
    sigma_max: float
    method: str
    sigma_min_nonzero: float | None = None  # smallest singular value above the tolerance (when known)

    @property
    def deficit(self) -> int:
        return self.unknowns - self.rank


@dataclass
class LayerSystem:
    """Normal equations (A^T A) x = A^T b of the weighted interior system A = [alpha K; W].

    With a noise model (`build_system(gradient_sigma=..., weight_sigma=...)`) each equation is
    weighted by its inverse variance instead: `gradient_weights` (1 / sigma^2 of each dL/dW
    equation, in gradient-block row order (C_out * kh * kw, C_in)) and `row_weights` (1 / tau^2
    of each weight-constraint row); None means today's alpha^2 and 1.
    """

    geometry: (
        ConvGeometry | None
    )  # None for systems assembled by autograd (attacks.layerwise.generic_systems)
    gram: np.ndarray
    rhs: np.ndarray | None
    alpha: float
    gradient_weights: np.ndarray | None = None
    row_weights: np.ndarray | None = None


def build_system(
    geom: ConvGeometry,
    weight: np.ndarray,
    k: np.ndarray,
    grad: np.ndarray | None = None,
    z: np.ndarray | None = None,
    weight_rows: np.ndarray | None = None,
    gradient_sigma: np.ndarray | None = None,
    weight_sigma: np.ndarray | None = None,
) -> LayerSystem:
    """Assemble the normal equations; `grad` (dL/dW) and `z` (output minus bias) give the rhs.

    Without a noise model alpha balances the two blocks (equal trace in A^T A) so that the rank
    tolerance and the least-squares weighting do not depend on the arbitrary scale of k
    relative to W.

    weight_rows: a 0/1 mask over the output (C_out, H_o, W_o): only those weight constraints are
    known (a ReLU above hides the rest); entries of z outside it are ignored.

    Generalised least squares: `gradient_sigma` (shaped like the weight) is the standard
    deviation of each observed dL/dW entry (`ObservedUpdate.gradient_noise`), `weight_sigma`
    (shaped like z) that of each weight constraint W x = z. The two blocks err for different
    reasons: the gradient equations carry the observation noise, the weight constraints carry
    the reconstruction error of the layer above pulled back through the inverse activation
    (std = that error / sigma'(z), so LeakyReLU rows at z < 0 weigh slope^2 as much), and k is
    exact up to sign flips (it comes from the head). Weighting each equation by its inverse
    variance gives the minimum-variance linear solve and makes A^T A the inverse error
    covariance of x. When only one block's noise is known the other gets a uniform std whose
    ratio to the known block's rms std is alpha, i.e. today's balance.
    """
    weight = np.asarray(weight, dtype=np.float64)
    kblock = gradient_block(geom, np.asarray(k, dtype=np.float64))
    if weight_rows is not None and z is not None:
        z = np.where(np.reshape(weight_rows, np.shape(z)), z, 0.0)
    alpha2 = balance(geom, weight, k, weight_rows) ** 2
    n = geom.pixels
    if gradient_sigma is None and weight_sigma is None:
        q = kblock.T @ kblock
        if weight_rows is None:
            gram = weight_gram(geom, weight)
        else:
            gram = weighted_weight_gram(geom, weight, weight_rows)
        for c in range(geom.in_channels):
            gram[c * n : (c + 1) * n, c * n : (c + 1) * n] += alpha2 * q
        rhs = None
        if grad is not None and z is not None:
            rhs = alpha2 * _gradient_rhs(geom, kblock, grad) + _weight_rhs(geom, weight, z)
        return LayerSystem(geom, gram, rhs, float(np.sqrt(alpha2)))
    alpha = float(np.sqrt(alpha2))
    if gradient_sigma is None:
        tau = np.asarray(weight_sigma, dtype=np.float64)
        gradient_sigma = np.full(weight.shape, float(np.sqrt(np.mean(tau**2))) / alpha)
    if weight_sigma is None:
        sig = np.asarray(gradient_sigma, dtype=np.float64)
        weight_sigma = np.full(geom.out_size, alpha * float(np.sqrt(np.mean(sig**2))))
    wg = equation_weights(geom, gradient_sigma)
    rows = inverse_variance(weight_sigma).ravel()
    if weight_rows is not None:
        rows = rows * np.ravel(weight_rows)
    gram = weighted_weight_gram(geom, weight, rows)
    for c, q in enumerate(channel_grams(kblock, wg)):
        gram[c * n : (c + 1) * n, c * n : (c + 1) * n] += q
    rhs = None
    if grad is not None and z is not None:
        rhs = _gradient_rhs(geom, kblock, grad, wg) + _weight_rhs(geom, weight, rows * np.ravel(z))
    return LayerSystem(geom, gram, rhs, alpha, wg, rows)


def inverse_variance(sigma: np.ndarray) -> np.ndarray:
    """1 / sigma^2, with zero (or denormal) sigmas floored at 1e-12 of the largest (no infinities)."""
    s = np.abs(np.asarray(sigma, dtype=np.float64))
    top = float(s.max()) if s.size else 0.0
    if top <= 0:
        raise ValueError("noise standard deviations must not all be zero; pass None for exact equations")
    return 1.0 / np.maximum(s, 1e-12 * top) ** 2


def equation_weights(geom: ConvGeometry, gradient_sigma: np.ndarray) -> np.ndarray:
    """1 / sigma^2 of each dL/dW equation in gradient-block row order: (C_out * kh * kw, C_in)."""
    w = inverse_variance(gradient_sigma).reshape(geom.out_channels, geom.in_channels, geom.offsets)
    return w.transpose(0, 2, 1).reshape(geom.out_channels * geom.offsets, geom.in_channels)


def channel_grams(kblock: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Kblk^T diag(weights[:, c]) Kblk for every input channel c: (C_in, H*W, H*W).

    With non-uniform weights the gradient block is no longer the same for every channel, but it
    stays block-diagonal over channels (x_c only enters the equations of channel c)."""
    if kblock.shape[1] == 1:  # a Linear layer: one unknown per channel
        return (weights.T @ kblock[:, 0] ** 2)[:, None, None]
    return np.stack([(kblock.T * weights[:, c]) @ kblock for c in range(weights.shape[1])])


def weighted_weight_gram(geom: ConvGeometry, weight: np.ndarray, row_weights: np.ndarray) -> np.ndarray:
    """W^T diag(row_weights) W on the interior unknowns (`weight_gram` with a weight per output
    entry (o, p), so the offset-pair blocks now depend on the output position): inverse
    variances under a noise model, or a 0/1 mask of the rows known after a ReLU."""
    n_in = geom.in_channels
    w = np.asarray(weight, dtype=np.float64).reshape(geom.out_channels, n_in, geom.offsets)
    rows = np.asarray(row_weights, dtype=np.float64).reshape(geom.out_channels, geom.out_pixels)
    if geom.is_linear:
        flat = w[:, :, 0]
        return flat.T @ (rows[:, :1] * flat)
    gram = np.zeros((geom.pixels, geom.pixels, n_in, n_in))
    positions = patch_positions(geom)
    for a in range(geom.offsets):
        for b in range(geom.offsets):
            both = np.flatnonzero((positions[a] >= 0) & (positions[b] >= 0))
            # rows with the same (a, b) never share a pixel pair (offset maps are injective)
            wa = rows[:, both, None] * w[:, None, :, a]  # (C_out, P, C_in)
            gram[positions[a, both], positions[b, both]] += np.matmul(wa.transpose(1, 2, 0), w[:, :, b])
    return gram.transpose(2, 0, 3, 1).reshape(geom.unknowns, geom.unknowns)


def balance(
    geom: ConvGeometry, weight: np.ndarray, k: np.ndarray, weight_rows: np.ndarray | None = None
) -> float:
    """alpha with tr(alpha^2 K^T K) = tr(W^T W): both blocks weigh the same in the least squares
    (W: the known weight constraints, `weight_rows` of them when given)."""
    w = np.asarray(weight, dtype=np.float64).reshape(geom.out_channels, geom.in_channels, geom.offsets)
    k = np.asarray(k, dtype=np.float64).reshape(geom.out_channels, geom.out_pixels)
    maps = offset_maps(geom)
    if weight_rows is None:
        hits = np.array([out_idx.size for out_idx, _ in maps], dtype=np.float64)
        w_trace = float(((w**2).sum(axis=(0, 1)) * hits).sum())
    else:
        m = np.asarray(weight_rows, dtype=np.float64).reshape(geom.out_channels, geom.out_pixels)
        hits_o = np.stack([m[:, out_idx].sum(axis=1) for out_idx, _ in maps], axis=1)  # (o, a)
        w_trace = float(((w**2).sum(axis=1) * hits_o).sum())
    k_trace = geom.in_channels * sum(float((k[:, out_idx] ** 2).sum()) for out_idx, _ in maps)
    return float(np.sqrt(w_trace / k_trace)) if k_trace > 0 and w_trace > 0 else 1.0


def solve_gradient_only(
    geom: ConvGeometry,
    k: np.ndarray,
    grad: np.ndarray,
    min_ratio: float = GRADIENT_ONLY_RATIO,
    gradient_sigma: np.ndarray | None = None,
    keep: dict | None = None,
) -> tuple[np.ndarray, RankInfo] | None:
    """Solve K x = vec(dL/dW) alone, one small shared system for all input channels.

    R-GAP does this for FC layers; it applies to any layer whose per-channel block Kblk has full
    column rank with sigma_min / sigma_max >= `min_ratio` (then the gradient alone determines
    the input, as well conditioned as the stacked system). Returns None when it does not apply.

    With `gradient_sigma` (std of each dL/dW entry, shaped like the weight) the equations are
    weighted by 1 / sigma^2 (generalised least squares): one small system per input channel,
    since the weights differ between channels. The applicability test stays on the unweighted
    block (it is a property of the layer and k, not of the noise). `keep`, when given, receives
    "inverse" (applies the inverse normal matrix to (n,) or (n, m) arrays), "gradient_weights"
    (the weight of each equation, gradient-block row order, None when unweighted) and, with a
    noise model, "variance": the error variance of each unknown, diag((K^T S^-1 K)^-1).
    """
    if geom.out_channels * geom.offsets < geom.pixels:
        return None
    kblock = gradient_block(geom, np.asarray(k, dtype=np.float64))
    lam, vecs = np.linalg.eigh(kblock.T @ kblock)
    if lam[-1] <= 0 or lam[0] < (min_ratio**2) * lam[-1]:
        return None
    n, n_in, pixels = geom.unknowns, geom.in_channels, geom.pixels
    info = RankInfo(n, n, float(np.sqrt(lam[0])), float(np.sqrt(lam[-1])), "gradient-only")
    if gradient_sigma is None:
        b = _gradient_rhs(geom, kblock, grad).reshape(n_in, pixels).T
        x = vecs @ ((vecs.T @ b) / lam[:, None])
        if keep is not None:
            keep["gradient_weights"] = None
            keep["inverse"] = _channel_inverse(vecs[None], lam[None], n_in)
        return x.T.ravel(), info
    wg = equation_weights(geom, gradient_sigma)
    lam_c, vecs_c = np.linalg.eigh(channel_grams(kblock, wg))  # (C_in, P), (C_in, P, P)
    lam_c = np.maximum(lam_c, (RANK_RTOL**2) * lam_c[:, -1:])  # guards round-off only
    b = _gradient_rhs(geom, kblock, grad, wg).reshape(n_in, pixels)
    x = np.einsum("cij,cj->ci", vecs_c, np.einsum("cji,cj->ci", vecs_c, b) / lam_c)
    if keep is not None:
        keep["gradient_weights"] = wg
        keep["inverse"] = _channel_inverse(vecs_c, lam_c, n_in)
        keep["variance"] = np.einsum("cij,cj->ci", vecs_c**2, 1.0 / lam_c).ravel()
    return x.ravel(), info


def _channel_inverse(vecs: np.ndarray, lam: np.ndarray, n_in: int):
    """v -> blockdiag_c(V_c diag(1/lam_c) V_c^T) v for v of shape (C_in * P,) or (C_in * P, m);
    a single (1, P, P) eigenbasis is shared by every channel."""

    def apply(v: np.ndarray) -> np.ndarray:
        shaped = np.asarray(v, dtype=np.float64).reshape(n_in, vecs.shape[-1], -1)
        coef = np.einsum("cji,cjm->cim", np.broadcast_to(vecs, (n_in, *vecs.shape[1:])), shaped)
        coef /= np.broadcast_to(lam, (n_in, lam.shape[-1]))[:, :, None]
        out = np.einsum("cij,cjm->cim", np.broadcast_to(vecs, (n_in, *vecs.shape[1:])), coef)
        return out.reshape(np.shape(v))

    return apply


def _gradient_rhs(
    geom: ConvGeometry, kblock: np.ndarray, grad: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    g = np.asarray(grad, dtype=np.float64).reshape(geom.out_channels, geom.in_channels, geom.offsets)
    g = g.transpose(0, 2, 1).reshape(geom.out_channels * geom.offsets, geom.in_channels)
    if weights is not None:
        g = weights * g
    return (kblock.T @ g).T.ravel()


def _weight_rhs(geom: ConvGeometry, weight: np.ndarray, z: np.ndarray) -> np.ndarray:
    if geom.is_linear:
        return weight.T @ np.asarray(z, dtype=np.float64).ravel()
    zt = _as_image(z, geom.out_channels, _out_hw(geom))
    x = torch.nn.grad.conv2d_input(
        (1, geom.in_channels, geom.height, geom.width),
        torch.from_numpy(weight),
        zt,
        stride=geom.stride,
        padding=geom.padding,
    )
    return x.numpy().ravel()


def _out_hw(geom: ConvGeometry) -> tuple[int, int]:
    return geom.out_height, geom.out_width


def _as_image(values: np.ndarray, channels: int, size: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64).reshape(1, channels, *size))


# ---------------------------------------------------------------------------------------------
# Forward operators (for residuals and for backpropagating k)
# ---------------------------------------------------------------------------------------------


def apply_weight(geom: ConvGeometry, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W x (no bias), float64, flat."""
    if geom.is_linear:
        return weight @ x.ravel()
    xt = _as_image(x, geom.in_channels, (geom.height, geom.width))
    out = F.conv2d(xt, torch.from_numpy(weight), stride=geom.stride, padding=geom.padding)
    return out.numpy().ravel()


def apply_gradient(
    geom: ConvGeometry, weight_shape: tuple[int, ...], k: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """K x = dL/dW for output gradient k and input x, float64, shaped like the weight."""
    if geom.is_linear:
        return np.outer(k.ravel(), x.ravel())
    xt = _as_image(x, geom.in_channels, (geom.height, geom.width))
    kt = _as_image(k, geom.out_channels, _out_hw(geom))
    g = torch.nn.grad.conv2d_weight(xt, weight_shape, kt, stride=geom.stride, padding=geom.padding)
    return g.numpy()


def backprop_input(geom: ConvGeometry, weight: np.ndarray, k: np.ndarray) -> np.ndarray:
    """W^T k restricted to the interior (padded positions dropped), float64, flat."""
    return _weight_rhs(geom, weight, k)


@dataclass(frozen=True)
class Residuals:
    """Relative residuals of a candidate x: stacked (alpha-weighted), gradient block, weight block."""

    stacked: float
    gradient: float
    weight: float


def residuals(
    geom: ConvGeometry,
    alpha: float,
    weight: np.ndarray,
    k: np.ndarray,
    grad: np.ndarray,
    z: np.ndarray,
    x: np.ndarray,
) -> Residuals:
    """||A x - b|| / ||b|| per block and stacked, with forward operators (no cancellation)."""
    r_w = apply_weight(geom, weight, x) - np.ravel(z)
    r_k = apply_gradient(geom, tuple(weight.shape), k, x).ravel() - np.ravel(grad)
    g2, z2 = float(np.ravel(grad) @ np.ravel(grad)), float(np.ravel(z) @ np.ravel(z))
    rk2, rw2 = float(r_k @ r_k), float(r_w @ r_w)
    den = alpha**2 * g2 + z2
    return Residuals(
        stacked=float(np.sqrt((alpha**2 * rk2 + rw2) / den)) if den > 0 else float(np.sqrt(rk2 + rw2)),
        gradient=float(np.sqrt(rk2 / g2)) if g2 > 0 else float(np.sqrt(rk2)),
        weight=float(np.sqrt(rw2 / z2)) if z2 > 0 else float(np.sqrt(rw2)),
    )


# ---------------------------------------------------------------------------------------------
# Solving and ranking
# ---------------------------------------------------------------------------------------------


def _top_eigenvalue(operator: np.ndarray | LinearOperator, n: int) -> float:
    """Largest eigenvalue by Lanczos to 1e-3 relative accuracy (diagnostics need no more)."""
    v0 = np.random.default_rng(0).standard_normal(n)
    return float(eigsh(operator, k=1, ncv=8, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)[0])


def _largest_eigenvalue(gram: np.ndarray) -> float:
    return _top_eigenvalue(gram, gram.shape[0])


def _smallest_eigenvalue(factor: tuple[np.ndarray, bool], n: int) -> float:
    """lambda_min by Lanczos on the inverse, applied through the Cholesky factor."""

    def solve(v: np.ndarray) -> np.ndarray:
        return sla.cho_solve(factor, v, check_finite=False)

    return 1.0 / _top_eigenvalue(LinearOperator((n, n), matvec=solve, dtype=np.float64), n)


# Below this size a full eigendecomposition is cheaper than Cholesky plus two Lanczos runs.
SMALL_SYSTEM = 400


def solve_normal(
    system: LayerSystem, rtol: float = RANK_RTOL, keep: dict | None = None
) -> tuple[np.ndarray | None, RankInfo]:
    """Least-squares solution (near minimum-norm when rank-deficient) and the numerical rank.

    Fast path: Cholesky, certified full rank when sigma_min / sigma_max > rtol (extreme
    eigenvalues of A^T A by Lanczos, 1e-3 relative accuracy). Otherwise a pivoted Cholesky
    (LAPACK pstrf, pivots > rtol^2 * lambda_max) gives the rank, and a Tikhonov-regularised
    Cholesky solve (shift rtol^2 * lambda_max) the minimum-norm solution to about 1e-6 relative.
    `keep`, when given, receives "inverse" (applies the (pseudo-, or for the Tikhonov path the
    regularised) inverse normal matrix to (n,) or (n, m) arrays) and, on the Cholesky path,
    "factor".
    """
    gram = system.gram
    n = gram.shape[0]
    if n <= SMALL_SYSTEM:
        return _solve_eigen(system, rtol, keep)
    lam_max = _largest_eigenvalue(gram)
    if lam_max <= 0:
        return (None if system.rhs is None else np.zeros(n)), RankInfo(0, n, 0.0, 0.0, "zero")
    try:
        factor = sla.cho_factor(gram, lower=False, check_finite=False)
        lam_min = _smallest_eigenvalue(factor, n)
    except (np.linalg.LinAlgError, ValueError):
        factor, lam_min = None, 0.0
    if factor is not None and lam_min > (rtol**2) * lam_max:
        if keep is not None:
            keep["factor"] = factor
            keep["inverse"] = _cholesky_inverse(factor)
        x = None if system.rhs is None else sla.cho_solve(factor, system.rhs, check_finite=False)
        return x, RankInfo(n, n, float(np.sqrt(lam_min)), float(np.sqrt(lam_max)), "cholesky")
    return _solve_deficient(system, rtol, lam_max, lam_min, keep)


def _cholesky_inverse(factor: tuple[np.ndarray, bool]):
    def apply(v: np.ndarray) -> np.ndarray:
        return sla.cho_solve(factor, v, check_finite=False)

    return apply


def _solve_deficient(
    system: LayerSystem, rtol: float, lam_max: float, lam_min: float, keep: dict | None = None
) -> tuple[np.ndarray | None, RankInfo]:
    """Rank by pivoted Cholesky; sigma_min is the Lanczos estimate, or 0 when Cholesky failed."""
    shift = (rtol**2) * lam_max
    _, _, rank, _ = sla.lapack.dpstrf(system.gram, tol=shift)
    x = None
    if system.rhs is not None or keep is not None:
        shifted = system.gram + shift * np.eye(system.gram.shape[0])
        factor = sla.cho_factor(shifted, check_finite=False)
        if system.rhs is not None:
            x = sla.cho_solve(factor, system.rhs, check_finite=False)
        if keep is not None:
            keep["inverse"] = _cholesky_inverse(factor)
    n = system.gram.shape[0]
    sigma_min = float(np.sqrt(max(lam_min, 0.0)))
    return x, RankInfo(int(rank), n, sigma_min, float(np.sqrt(lam_max)), "pivoted-cholesky+tikhonov")


class Resolver:
    """Re-solves a full-rank stacked system after k changed in a few entries (derivative signs).

    Only the gradient block depends on k, and it is block-diagonal over input channels: the new
    normal matrix is the old one with each channel's diagonal block changed by
    Kblk_new^T G_c Kblk_new - Kblk_old^T G_c Kblk_old (G: the gradient equations' weights,
    alpha^2 without a noise model). So the matrix is patched, not rebuilt (no weight Gram),
    and refactorised without a new rank estimate (a few changed entries of k do not move the
    spectrum across the rank tolerance). The new factor gives the exact inverse that the next
    round of sign statistics needs, which preconditioned CG from the old factor did not.
    """

    def __init__(
        self, system: LayerSystem, factor: tuple[np.ndarray, bool], weight: np.ndarray, k: np.ndarray
    ) -> None:
        self.system = system
        self.factor = factor
        self.weight = np.asarray(weight, dtype=np.float64)
        self.kblock = gradient_block(system.geometry, np.asarray(k, dtype=np.float64))

    def refresh(self, k: np.ndarray, grad: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, Resolver] | None:
        """The solution for the new k and a Resolver for it; None when the patched normal
        matrix is no longer positive definite (then solve it from scratch)."""
        geom, system = self.system.geometry, self.system
        kblock = gradient_block(geom, np.asarray(k, dtype=np.float64))
        n = geom.pixels
        if system.gradient_weights is None:
            weights = np.full((kblock.shape[0], geom.in_channels), system.alpha**2)
            rhs = system.alpha**2 * _gradient_rhs(geom, kblock, grad) + _weight_rhs(geom, self.weight, z)
        else:
            weights = system.gradient_weights
            rows = system.row_weights if system.row_weights is not None else 1.0
            rhs = _gradient_rhs(geom, kblock, grad, weights) + _weight_rhs(
                geom, self.weight, rows * np.ravel(z)
            )
        gram = system.gram.copy()
        change = channel_grams(kblock, weights) - channel_grams(self.kblock, weights)
        for c in range(geom.in_channels):
            gram[c * n : (c + 1) * n, c * n : (c + 1) * n] += change[c]
        try:
            factor = sla.cho_factor(gram, lower=False, check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            return None
        new_system = LayerSystem(geom, gram, rhs, system.alpha, system.gradient_weights, system.row_weights)
        x = sla.cho_solve(factor, rhs, check_finite=False)
        return x, Resolver(new_system, factor, self.weight, k)

    def inverse(self):
        """Applies the inverse normal matrix (through the Cholesky factor)."""
        return _cholesky_inverse(self.factor)


def layer_rank(geom: ConvGeometry, weight: np.ndarray, k: np.ndarray, rtol: float = RANK_RTOL) -> RankInfo:
    """Numerical rank of the interior system [alpha K; W] for output gradient k (no rhs needed).

    The rank of R-GAP's padded system [K; W; P] is this rank plus `geom.padding_unknowns`.
    """
    if geom.is_linear:
        return _linear_rank(geom, weight, k, rtol)
    _, info = solve_normal(build_system(geom, weight, k), rtol)
    return info


def _linear_rank(geom: ConvGeometry, weight: np.ndarray, k: np.ndarray, rtol: float) -> RankInfo:
    """A^T A = alpha^2 |k|^2 I + W^T W: its spectrum from the smaller of W W^T and W^T W."""
    w = np.asarray(weight, dtype=np.float64).reshape(geom.out_channels, geom.in_channels)
    k = np.asarray(k, dtype=np.float64).ravel()
    shift = balance(geom, weight, k) ** 2 * float(k @ k)
    n = geom.in_channels
    lam_w = np.linalg.eigvalsh(w @ w.T if geom.out_channels < n else w.T @ w)
    lam_w = np.concatenate([np.zeros(max(n - lam_w.size, 0)), np.clip(lam_w, 0.0, None)])
    lam = np.sort(shift + lam_w)
    return _rank_info(lam, lam > (rtol**2) * lam[-1], "analytic")


def _rank_info(lam: np.ndarray, keep: np.ndarray, method: str) -> RankInfo:
    lam_max = max(float(lam[-1]), 0.0)
    nonzero = float(np.sqrt(lam[keep].min())) if keep.any() else 0.0
    return RankInfo(
        int(keep.sum()), lam.size, float(np.sqrt(max(lam[0], 0.0))), float(np.sqrt(lam_max)), method, nonzero
    )


def _solve_eigen(
    system: LayerSystem, rtol: float, keep: dict | None = None
) -> tuple[np.ndarray | None, RankInfo]:
    lam, vecs = np.linalg.eigh(system.gram)
    kept = lam > (rtol**2) * lam[-1]
    v = vecs[:, kept]
    x = None
    if system.rhs is not None:
        x = v @ ((v.T @ system.rhs) / lam[kept])
    if keep is not None:
        keep["inverse"] = lambda u: v @ ((v.T @ u) / lam[kept].reshape(-1, *([1] * (np.ndim(u) - 1))))
    return x, _rank_info(lam, kept, "eigh")


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def invert_activation(module: nn.Module, y: np.ndarray) -> np.ndarray:
    """z = sigma^{-1}(y); tanh / sigmoid outputs are clipped first (saturation loses information)."""
    if isinstance(module, nn.LeakyReLU):
        return np.where(y >= 0, y, y / module.negative_slope)
    if isinstance(module, nn.Tanh):
        return np.arctanh(np.clip(y, -TANH_CLIP, TANH_CLIP))
    if isinstance(module, nn.Sigmoid):
        s = np.clip(y, SIGMOID_CLIP, 1 - SIGMOID_CLIP)
        return np.log(s) - np.log1p(-s)
    return y


def activation_derivative(module: nn.Module, z: np.ndarray) -> np.ndarray:
    """sigma'(z), used to backpropagate k through the reconstructed pre-activation."""
    if isinstance(module, nn.LeakyReLU):
        return np.where(z > 0, 1.0, module.negative_slope)
    if isinstance(module, nn.Tanh):
        return 1.0 - np.tanh(z) ** 2
    if isinstance(module, nn.Sigmoid):
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 - s)
    return np.ones_like(z)
