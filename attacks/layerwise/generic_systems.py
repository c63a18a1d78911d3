"""Layer-wise systems built with autograd, for any layer whose output is bilinear in (input, weight).

Layer-wise inversion needs, for one layer with input x, weight W and output gradient k = dL/dz:

    gradient constraints  K(k) x = vec(dL/dW)
    weight constraints    what the ops above tell about z = W x (+ b): z on some rows, T z = r

For any layer with z = f(x, W) + b and f bilinear (Linear on vectors or sequences, Conv1d/2d/3d of
any stride, padding, dilation and groups, Embedding on one-hot tokens, the projections inside
attention and recurrent cells), every operator follows from f by autograd, so a new layer type
needs no hand-written matrix builder:

    W x    = f(x, W)                        W^T z    = d/dx <z, f(x, W)>
    K(k) x = d/dW <k, f(x, W)>              K(k)^T g = d/dx <k, f(x, g)>   (f is linear in W)

The normal matrix A^T A of the weighted system A = [alpha K; M] (M: the weight constraints that
are known) is assembled column block by column block: K and M are probed on blocks of basis
vectors and kept sparse, so no dense A is ever formed; ranks and solutions then come from the
same `solve_normal` as the structured path. Plain Conv2d / Linear keep the structured path of
`attacks.layerwise.systems` (fast); `tests/attacks/layerwise/test_layer_ops.py` checks that both agree.

Extra unknowns (BatchNorm in train mode: the batch's per-channel scale and mean) border the
system: their columns in z-space and in the gradient rows are given explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn import functional as F

from attacks.base import AttackError
from attacks.layerwise.systems import (
    RANK_RTOL,
    ConvGeometry,
    LayerSystem,
    RankInfo,
    gradient_block,
    offset_maps,
    solve_normal,
    weight_gram,
    weighted_weight_gram,
)

# The dense normal matrix of a generic layer holds unknowns^2 float64 (8,192: 0.5 GB).
GENERIC_MAX_UNKNOWNS = 8192
# Entries of one probed block (basis vectors x outputs): 2^23 float64 = 64 MB.
PROBE_ENTRIES = 1 << 23

BilinearFunction = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class BilinearLayer:
    """z = function(x, weight) (+ bias): the layer as autograd sees it, x of shape `in_shape`.

    For Embedding the unknown x is the one-hot matrix (T, V) of the tokens.
    """

    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight: Tensor  # float64, detached
    function: BilinearFunction  # (x (B, *in_shape), weight) -> (B, *out_shape), linear in each
    padding_unknowns: int = 0  # zero-padded entries R-GAP counts as unknowns (each also a constraint)

    @property
    def unknowns(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def padded_unknowns(self) -> int:
        return self.unknowns + self.padding_unknowns

    @property
    def out_size(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def weight_count(self) -> int:
        return int(self.weight.numel())

    # ---------------------------------------------------------------------------------------
    def apply(self, x: np.ndarray) -> np.ndarray:
        """W x for a batch of flat inputs (B, n_x) -> (B, n_z)."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1, *self.in_shape)
        with torch.no_grad():
            return self.function(xt, self.weight).reshape(xt.shape[0], -1).numpy()

    def adjoint(self, z: np.ndarray) -> np.ndarray:
        """W^T z for a batch of flat output vectors (B, n_z) -> (B, n_x)."""
        zt = torch.as_tensor(np.asarray(z, dtype=np.float64)).reshape(-1, *self.out_shape)
        x0 = torch.zeros((zt.shape[0], *self.in_shape), dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(self.function(x0, self.weight), x0, grad_outputs=zt)
        return gx.reshape(zt.shape[0], -1).numpy()

    def weight_gradient(self, k: np.ndarray, x: np.ndarray) -> np.ndarray:
        """K(k) x = dL/dW for each flat input of the batch (B, n_x) -> (B, n_w)."""
        kt = torch.as_tensor(np.asarray(k, dtype=np.float64)).reshape(1, *self.out_shape)
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1, *self.in_shape)

        def one(xi: Tensor) -> Tensor:
            return grad(lambda w: (self.function(xi[None], w) * kt).sum())(self.weight)

        return vmap(one)(xt).reshape(xt.shape[0], -1).detach().numpy()

    def gradient_adjoint(self, k: np.ndarray, g: np.ndarray) -> np.ndarray:
        """K(k)^T g for each flat weight-shaped vector of the batch (B, n_w) -> (B, n_x)."""
        kt = torch.as_tensor(np.asarray(k, dtype=np.float64)).reshape(1, *self.out_shape)
        gt = torch.as_tensor(np.asarray(g, dtype=np.float64)).reshape(-1, *self.weight.shape)
        x0 = torch.zeros((1, *self.in_shape), dtype=torch.float64)

        def one(gi: Tensor) -> Tensor:
            return grad(lambda x: (self.function(x, gi) * kt).sum())(x0)

        return vmap(one)(gt).reshape(gt.shape[0], -1).detach().numpy()


def _padded_function(module: nn.Module, conv: Callable[..., Tensor]) -> BilinearFunction:
    """ConvNd without bias; non-zero padding modes pad explicitly (still linear in x)."""
    if module.padding_mode != "zeros" and not isinstance(module.padding, str):
        pad: list[int] = []
        for p in reversed(module.padding):
            pad += [int(p), int(p)]

        def padded(x: Tensor, w: Tensor) -> Tensor:
            xp = F.pad(x, pad, mode=module.padding_mode)
            return conv(xp, w, None, module.stride, 0, module.dilation, module.groups)

        return padded

    def plain(x: Tensor, w: Tensor) -> Tensor:
        return conv(x, w, None, module.stride, module.padding, module.dilation, module.groups)

    return plain


def _conv_padding_unknowns(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return 0
    padded = int(np.prod([s + 2 * int(p) for s, p in zip(in_shape[1:], module.padding, strict=True)]))
    return in_shape[0] * padded - int(np.prod(in_shape))


CONVS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
BILINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def bilinear_layer_of(module: nn.Module, in_shape: tuple[int, ...], index: int) -> BilinearLayer:
    """The layer as a bilinear map, for inputs of shape `in_shape` (no batch dim; token ids for
    Embedding). Raises AttackError for modules that are not Linear / ConvNd / Embedding."""
    weight = module.weight.detach().double().cpu() if hasattr(module, "weight") else None
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        if not in_shape or in_shape[-1] != module.in_features:
            raise AttackError(
                f"layer {index} (Linear) expects inputs (..., {module.in_features}), got {in_shape}"
            )
        out_shape = (*in_shape[:-1], module.out_features)
        return BilinearLayer(kind, tuple(in_shape), out_shape, weight, lambda x, w: F.linear(x, w))
    if type(module) in CONVS:
        conv = CONVS[type(module)]
        function = _padded_function(module, conv)
        with torch.no_grad():
            out = function(torch.zeros((1, *in_shape), dtype=torch.float64), weight)
        padding = _conv_padding_unknowns(module, tuple(in_shape))
        return BilinearLayer(kind, tuple(in_shape), tuple(out.shape[1:]), weight, function, padding)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise AttackError(f"layer {index} (Embedding) renormalises rows (max_norm); it is not bilinear")
        unknown = (*in_shape, module.num_embeddings)
        out_shape = (*in_shape, module.embedding_dim)
        return BilinearLayer(kind, unknown, out_shape, weight, lambda x, w: x @ w)
    raise AttackError(f"layer {index} ({kind}) is not a Linear, Conv1d/2d/3d or Embedding layer")


def projection(weight: Tensor, in_shape: tuple[int, ...], kind: str = "projection") -> BilinearLayer:
    """x -> x W^T on the last axis: the input projections of attention (`in_proj_weight`) and of
    recurrent cells (`weight_ih_l0`, each gate's rows), whose gradient is sum_t k_t x_t^T."""
    w = weight.detach().double().cpu()
    return BilinearLayer(
        kind, tuple(in_shape), (*in_shape[:-1], w.shape[0]), w, lambda x, ww: F.linear(x, ww)
    )


# ---------------------------------------------------------------------------------------------
# Probed sparse matrices
# ---------------------------------------------------------------------------------------------


def _probe(apply: Callable[[np.ndarray], np.ndarray], n_in: int, n_out: int) -> sp.csr_matrix:
    """The matrix of a linear map given as a batched function, probed on basis blocks."""
    block = max(1, min(n_in, PROBE_ENTRIES // max(n_out, n_in, 1)))
    rows, cols, vals = [], [], []
    for start in range(0, n_in, block):
        stop = min(start + block, n_in)
        basis = np.zeros((stop - start, n_in))
        basis[np.arange(stop - start), np.arange(start, stop)] = 1.0
        out = apply(basis)  # (B, n_out): column j of the matrix is out[j - start]
        j, i = np.nonzero(out)
        rows.append(i)
        cols.append(j + start)
        vals.append(out[j, i])
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in)
    )


def weight_matrix(layer: BilinearLayer) -> sp.csr_matrix:
    """W (n_z x n_x), sparse, probed with autograd."""
    return _probe(layer.apply, layer.unknowns, layer.out_size)


def gradient_matrix(layer: BilinearLayer, k: np.ndarray) -> sp.csr_matrix:
    """K(k) (n_w x n_x), sparse, probed with autograd."""
    return _probe(lambda e: layer.weight_gradient(k, e), layer.unknowns, layer.weight_count)


def structured_weight_matrix(geom: ConvGeometry, weight: np.ndarray) -> sp.csr_matrix:
    """W of a plain Conv2d / Linear (interior unknowns), sparse, from the kernel-offset maps."""
    w = np.asarray(weight, dtype=np.float64)
    if geom.is_linear:
        return sp.csr_matrix(w.reshape(geom.out_channels, geom.in_channels))
    w = w.reshape(geom.out_channels, geom.in_channels, geom.offsets)
    rows, cols, vals = [], [], []
    o = np.arange(geom.out_channels)[:, None, None]
    c = np.arange(geom.in_channels)[None, :, None]
    for a, (out_idx, in_idx) in enumerate(offset_maps(geom)):
        r = o * geom.out_pixels + out_idx[None, None, :]
        q = c * geom.pixels + in_idx[None, None, :]
        r, q = np.broadcast_arrays(r, q)
        rows.append(r.ravel())
        cols.append(q.ravel())
        vals.append(np.broadcast_to(w[:, :, a, None], r.shape).ravel())
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(geom.out_size, geom.unknowns),
    )


# ---------------------------------------------------------------------------------------------
# What is known about the layer output, and the assembled system
# ---------------------------------------------------------------------------------------------


@dataclass
class OutputConstraints:
    """What the ops above tell about the layer's output z (bias removed), flat over z:

    z[rows] = values[rows]; linear @ z = linear_rhs; and, with extra unknowns e (BatchNorm in
    train mode), z = extra_z @ e on those rows instead (homogeneous: values are not used), with
    the gradient rows of output channel `extra_scale[j]` scaled by e_j (-1: no gradient part).
    """

    rows: np.ndarray
    values: np.ndarray
    linear: sp.csr_matrix | None = None
    linear_rhs: np.ndarray | None = None
    extra_z: np.ndarray | None = None
    extra_scale: tuple[int, ...] = ()
    extra_names: tuple[str, ...] = ()

    @classmethod
    def full(cls, z: np.ndarray) -> OutputConstraints:
        z = np.asarray(z, dtype=np.float64).ravel()
        return cls(np.ones(z.size, dtype=bool), z)

    @property
    def is_full(self) -> bool:
        return bool(self.rows.all()) and self.linear is None and self.extra_z is None

    @property
    def selection_only(self) -> bool:
        return self.linear is None and self.extra_z is None

    @property
    def extra_count(self) -> int:
        return 0 if self.extra_z is None else int(self.extra_z.shape[1])

    @property
    def equations(self) -> int:
        return int(self.rows.sum()) + (0 if self.linear is None else int(self.linear.shape[0]))

    def minus(self, offset: np.ndarray) -> OutputConstraints:
        """The same constraints on z - offset (removing a bias); extras absorb it into the mean."""
        offset = np.asarray(offset, dtype=np.float64).ravel()
        rhs = None if self.linear is None else self.linear_rhs - self.linear @ offset
        return OutputConstraints(
            self.rows,
            self.values - offset,
            self.linear,
            rhs,
            self.extra_z,
            self.extra_scale,
            self.extra_names,
        )

    def matrix_rows(self, wmat: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        """M = [W[rows]; T W] and its right-hand side."""
        blocks, rhs = [wmat[self.rows]], [self.values[self.rows]]
        if self.linear is not None:
            blocks.append(sp.csr_matrix(self.linear @ wmat))
            rhs.append(np.asarray(self.linear_rhs, dtype=np.float64))
        return sp.vstack(blocks, format="csr"), np.concatenate(rhs)

    def extra_rows(self) -> np.ndarray:
        """The extra unknowns' columns in the rows of `matrix_rows` (n_rows x e)."""
        assert self.extra_z is not None
        parts = [self.extra_z[self.rows]]
        if self.linear is not None:
            parts.append(self.linear @ self.extra_z)
        return np.vstack(parts)


@dataclass
class SystemParts:
    """A layer's assembled normal equations plus what residuals and reports need."""

    system: LayerSystem
    gradient_gram: np.ndarray = field(repr=False)
    equations: int
    extra: int


def bias_vector(bias: np.ndarray | None, out_shape: tuple[int, ...], channels_first: bool) -> np.ndarray:
    """The bias broadcast over the output: along axis 0 for convs, the last axis for Linear."""
    if bias is None:
        return np.zeros(int(np.prod(out_shape)))
    b = np.asarray(bias, dtype=np.float64)
    if channels_first:
        return np.broadcast_to(b.reshape(-1, *([1] * (len(out_shape) - 1))), out_shape).ravel()
    return np.broadcast_to(b, out_shape).ravel()


def _structured_gradient_gram(geom: ConvGeometry, k: np.ndarray) -> np.ndarray:
    kblock = gradient_block(geom, np.asarray(k, dtype=np.float64))
    return np.kron(np.eye(geom.in_channels), kblock.T @ kblock)


def assemble(
    layer: BilinearLayer,
    geom: ConvGeometry | None,
    k: np.ndarray,
    cons: OutputConstraints,
    grad_w: np.ndarray | None = None,
) -> SystemParts:
    """Normal equations of [alpha K; M] x = [alpha vec(dL/dW); r] (M: known weight constraints).

    Structured pieces are used where the layer has a `geom` (plain Conv2d / Linear): K^T K = I (x) Q
    and, for row masks, the masked weight Gram; everything else is probed with autograd. alpha
    balances the traces of the two blocks. With extra unknowns the system is homogeneous in them
    and the returned rhs is None (ranks only).
    """
    n = layer.unknowns
    if geom is None and n > GENERIC_MAX_UNKNOWNS:
        raise AttackError(
            f"{layer.kind} with {n} unknowns exceeds the dense generic limit ({GENERIC_MAX_UNKNOWNS}); "
            "see the end-to-end identifiability (matrix-free) instead"
        )
    k = np.asarray(k, dtype=np.float64)
    weight = layer.weight.numpy()
    if geom is not None:
        gk = _structured_gradient_gram(geom, k)
    else:
        kmat = gradient_matrix(layer, k)
        gk = (kmat.T @ kmat).toarray()
    mrows = None
    if geom is not None and cons.selection_only:
        gw = weight_gram(geom, weight) if cons.rows.all() else weighted_weight_gram(geom, weight, cons.rows)
        w_rhs = layer.adjoint(np.where(cons.rows, cons.values, 0.0)[None])[0]
    else:
        wmat = structured_weight_matrix(geom, weight) if geom is not None else weight_matrix(layer)
        mrows, r = cons.matrix_rows(wmat)
        gw = (mrows.T @ mrows).toarray()
        w_rhs = mrows.T @ r
    tk, tw = float(np.trace(gk)), float(np.trace(gw))
    alpha2 = tw / tk if tk > 0 and tw > 0 else 1.0
    gram = alpha2 * gk + gw
    rhs = None
    if grad_w is not None:
        rhs = alpha2 * layer.gradient_adjoint(k, np.ravel(grad_w)[None])[0] + w_rhs
    extra = cons.extra_count
    if extra:
        gram = _bordered(layer, k, cons, mrows, gram, alpha2, grad_w)
        rhs = None
    system = LayerSystem(geom, gram, rhs, float(np.sqrt(alpha2)))
    return SystemParts(system, gk, layer.weight_count + cons.equations, extra)


def _bordered(
    layer: BilinearLayer,
    k: np.ndarray,
    cons: OutputConstraints,
    mrows: sp.csr_matrix | None,
    gram: np.ndarray,
    alpha2: float,
    grad_w: np.ndarray | None,
) -> np.ndarray:
    """[[A^T A, A^T B], [B^T A, B^T B]] for the extra unknowns' columns B = [alpha Bg; Bm]."""
    assert mrows is not None and cons.extra_z is not None
    bm = -cons.extra_rows()  # (n_rows, e)
    e = bm.shape[1]
    bg = np.zeros((layer.weight_count, e))
    if any(c >= 0 for c in cons.extra_scale):
        if grad_w is None:
            raise ValueError("extra scale unknowns need the observed weight gradient")
        g = np.asarray(grad_w, dtype=np.float64).reshape(layer.weight.shape[0], -1)
        for j, channel in enumerate(cons.extra_scale):
            if channel >= 0:
                col = np.zeros_like(g)
                col[channel] = -g[channel]
                bg[:, j] = col.ravel()
    cross = alpha2 * layer.gradient_adjoint(k, bg.T).T + mrows.T @ bm  # (n, e)
    corner = alpha2 * bg.T @ bg + bm.T @ bm
    return np.block([[gram, cross], [cross.T, corner]])


def constrained_rank(
    layer: BilinearLayer,
    geom: ConvGeometry | None,
    k: np.ndarray,
    cons: OutputConstraints,
    grad_w: np.ndarray | None = None,
    rtol: float = RANK_RTOL,
) -> tuple[RankInfo, SystemParts]:
    """Numerical rank of the layer's system (interior unknowns plus any extra unknowns)."""
    parts = assemble(layer, geom, k, cons, grad_w)
    system = LayerSystem(parts.system.geometry, parts.system.gram, None, parts.system.alpha)
    _, info = solve_normal(system, rtol)
    return info, parts


def constrained_solve(
    layer: BilinearLayer,
    geom: ConvGeometry | None,
    k: np.ndarray,
    cons: OutputConstraints,
    grad_w: np.ndarray,
    rtol: float = RANK_RTOL,
) -> tuple[np.ndarray, RankInfo, float]:
    """Least-squares x (minimum-norm where deficient), its rank info and alpha."""
    if cons.extra_count:
        raise AttackError(f"{layer.kind}: unknown batch statistics make the system homogeneous")
    parts = assemble(layer, geom, k, cons, grad_w)
    x, info = solve_normal(parts.system, rtol)
    assert x is not None
    return x, info, parts.system.alpha


@dataclass(frozen=True)
class ConstrainedResiduals:
    """Relative residuals of x: stacked (alpha-weighted), gradient block, known weight constraints."""

    stacked: float
    gradient: float
    weight: float


def constrained_residuals(
    layer: BilinearLayer,
    k: np.ndarray,
    cons: OutputConstraints,
    grad_w: np.ndarray,
    x: np.ndarray,
    alpha: float,
) -> ConstrainedResiduals:
    """||A x - b|| / ||b|| per block, with forward operators (rows the ops hide are left out)."""
    g = np.ravel(grad_w).astype(np.float64)
    r_k = layer.weight_gradient(k, np.ravel(x)[None])[0] - g
    z = layer.apply(np.ravel(x)[None])[0]
    r_w = [z[cons.rows] - cons.values[cons.rows]]
    b_w = [cons.values[cons.rows]]
    if cons.linear is not None:
        r_w.append(cons.linear @ z - cons.linear_rhs)
        b_w.append(np.asarray(cons.linear_rhs))
    rw, bw = np.concatenate(r_w), np.concatenate(b_w)
    rk2, rw2, g2, z2 = float(r_k @ r_k), float(rw @ rw), float(g @ g), float(bw @ bw)
    den = alpha**2 * g2 + z2
    return ConstrainedResiduals(
        stacked=float(np.sqrt((alpha**2 * rk2 + rw2) / den)) if den > 0 else float(np.sqrt(rk2 + rw2)),
        gradient=float(np.sqrt(rk2 / g2)) if g2 > 0 else float(np.sqrt(rk2)),
        weight=float(np.sqrt(rw2 / z2)) if z2 > 0 else float(np.sqrt(rw2)),
    )
