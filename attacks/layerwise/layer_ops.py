"""Pull-back through the operations between two layers: what the server learns about a layer's
output z and its gradient k = dL/dz from the reconstructed input of the layer above.

Walking down from y (the next layer's input, reconstructed) and g = dL/dy, each op turns what is
known about its output into what is known about its input:

* reshapes (Flatten, Unflatten, Identity, Dropout in eval mode): nothing changes;
* invertible activations (LeakyReLU with slope > 0, Tanh, Sigmoid, Softplus, ELU, CELU): the
  input is sigma^{-1}(output), k = g * sigma'(input) (tanh / sigmoid are clipped, as COPA does);
* GELU / SiLU: invertible where monotone, i.e. for outputs >= 0. A negative output has two
  preimages, one on each side of the minimum (GELU at -0.7518, SiLU at -1.2785); the attack takes
  the branch above the minimum and says how many entries that concerns; the security report takes
  the true branch (an upper bound on leakage when any output is negative);
* ReLU (and LeakyReLU with slope 0): outputs > 0 give exact weight constraints (z = y there);
  outputs at zero give none, and dL/dz is zero there. A reconstructed output counts as zero up
  to the larger of `zero_rtol` x the largest output and 4 x the largest negative value (a ReLU
  output is never negative, so those measure the reconstruction's noise);
* BatchNorm in eval mode: affine per channel, inverted (a zero scale hides that channel);
* a known per-channel scale (a module with `unit_scale()`, e.g. the DAM gate of models.dam):
  affine with zero shift, inverted the same way (a zero-gated channel is hidden);
* BatchNorm in train mode (batch statistics): the batch mean and variance of each channel are
  unknown to the server. The report counts them as 2 C extra unknowns of the layer below (the
  system becomes homogeneous: the input is determined at best up to scale); the attack declines;
* linear ops (average pooling, adaptive average pooling, zero padding, nearest upsampling): linear
  constraints T z = r on the input, k = T^T g; entries that a constraint fixes alone become known;
* max pooling: which input won each window is not known to the server. The attack declines; the
  report assumes the winners known (weight constraints on the winners, k zero elsewhere), which
  makes its rank an upper bound on leakage;
* Dropout in train mode: zeros of the output reveal the dropped entries (like ReLU zeros);
* ReLU / Dropout / activations *under* a linear op (e.g. ReLU then average pooling): which
  entries of each window are active is hidden, so k is unknown. The attack declines; the report
  assumes the pattern known (an upper bound). Invertible activations under a linear op would need
  nonlinear constraints: not treated.

Anything else (residual blocks, attention, custom modules) is not treated layer-wise: the network
plan names it, the report says so and points to the end-to-end identifiability.

With `oracle` (the true input of every op, from a probe forward pass) hidden quantities are taken
from it and the result is flagged `upper_bound`; without it (the attack) they raise AttackError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn import functional as F

from attacks.base import AttackError
from attacks.layerwise.generic_systems import PROBE_ENTRIES, OutputConstraints
from attacks.layerwise.systems import activation_derivative, invert_activation

Op = tuple[int, nn.Module, tuple[int, ...]]  # (module index, op, shape of the op's input)

# A reconstructed ReLU output counts as zero when <= this times the largest known output, or
# when <= RELU_NOISE_MARGIN times the largest negative reconstructed output (noise, see _masking).
RELU_ZERO_RTOL = 1e-6
RELU_NOISE_MARGIN = 4.0

RESHAPE_OPS = (nn.Flatten, nn.Unflatten, nn.Identity)
CLIPPED_ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.LeakyReLU)  # inverted by layerwise_systems
MONOTONE_ACTIVATIONS = (nn.Softplus, nn.ELU, nn.CELU)
# Non-monotone activations and where their minimum lies (argmin, measured on a 1e-5 grid).
BRANCH_ACTIVATIONS: dict[type[nn.Module], float] = {nn.GELU: -0.75179, nn.SiLU: -1.27846}
LINEAR_OPS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def op_kind(op: nn.Module) -> str | None:
    """How the pull-back treats `op` (see the module doc), or None when it is not treated."""
    if isinstance(op, RESHAPE_OPS):
        return "reshape"
    if isinstance(op, DROPOUTS):
        return "dropout" if op.training and op.p > 0 else "reshape"
    if isinstance(op, nn.ReLU) or (isinstance(op, nn.LeakyReLU) and op.negative_slope == 0):
        return "relu"
    if isinstance(op, nn.LeakyReLU) and op.negative_slope < 0:
        return None
    if isinstance(op, (*CLIPPED_ACTIVATIONS, *MONOTONE_ACTIVATIONS)):
        if isinstance(op, (nn.ELU, nn.CELU)) and op.alpha <= 0:
            return None
        return "elementwise"
    if type(op) in BRANCH_ACTIVATIONS:
        return "branch"
    if _declares_unit_scale(op):
        return "affine"
    if isinstance(op, BATCH_NORMS):
        return "batchnorm-train" if op.training or not op.track_running_stats else "affine"
    if isinstance(op, LINEAR_OPS):
        return "linear"
    if isinstance(op, nn.Upsample) and op.mode == "nearest":
        return "linear"
    if isinstance(op, MAX_POOLS):
        return None if getattr(op, "return_indices", False) else "maxpool"
    return None


def describe(index: int, op: nn.Module) -> str:
    return f"layer {index} ({type(op).__name__})"


@dataclass
class PullBack:
    """What is known about a layer's output z (flat, bias not removed) and k = dL/dz."""

    k: np.ndarray  # z-shaped
    constraints: OutputConstraints
    notes: list[str] = field(default_factory=list)
    upper_bound: bool = False  # True when hidden quantities were taken from the oracle
    activation: nn.Module | None = None  # the activation right above the layer (sign correction)
    activation_grad: np.ndarray | None = None  # dL/d(its output), z-shaped

    @property
    def treatment(self) -> str:
        return "; ".join(self.notes)


@dataclass
class _State:
    """Knowledge about the current tensor u: values on `mask`, T u = r, k = dL/du (all known)."""

    shape: tuple[int, ...]
    k: np.ndarray
    mask: np.ndarray
    values: np.ndarray
    linear: sp.csr_matrix | None = None
    rhs: np.ndarray | None = None
    extra_z: np.ndarray | None = None
    extra_scale: tuple[int, ...] = ()
    extra_names: tuple[str, ...] = ()

    def reshape(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.k = self.k.reshape(shape)
        self.mask = self.mask.reshape(shape)
        self.values = self.values.reshape(shape)


def pull_back(
    ops: Sequence[Op],
    y: np.ndarray,
    g: np.ndarray,
    oracle: Sequence[np.ndarray] | None = None,
    zero_rtol: float = RELU_ZERO_RTOL,
) -> PullBack:
    """Walk `ops` (from a layer's output up to the next layer's input) back down from y, g.

    oracle: the true input of each op (same order as `ops`, then the true y); hidden quantities
    (max-pool winners, ReLU patterns under pooling, GELU branches, batch statistics) come from it.
    """
    y = np.asarray(y, dtype=np.float64)
    state = _State(
        y.shape, np.asarray(g, dtype=np.float64).reshape(y.shape), np.ones(y.shape, bool), y.copy()
    )
    result = PullBack(state.k, OutputConstraints.full(y))
    for position in range(len(ops) - 1, -1, -1):
        index, op, in_shape = ops[position]
        truth = None if oracle is None else np.asarray(oracle[position], dtype=np.float64)
        truth_out = None if oracle is None else np.asarray(oracle[position + 1], dtype=np.float64)
        kind = op_kind(op)
        if state.extra_z is not None:
            raise AttackError(
                f"{describe(index, op)} sits between a layer and its train-mode BatchNorm; "
                "not treated layer-wise"
            )
        if kind == "reshape":
            state.reshape(in_shape)
            continue
        result.activation, result.activation_grad = None, None
        if kind == "elementwise":
            result.activation, result.activation_grad = op, state.k.copy()
            _elementwise(index, op, state, truth)
        elif kind == "branch":
            result.upper_bound |= _branch(index, op, state, truth, result.notes)
        elif kind in ("relu", "dropout"):
            result.upper_bound |= _masking(index, op, kind, state, truth, truth_out, zero_rtol, result.notes)
        elif kind == "affine":
            scale, shift = _known_affine(op)
            _affine(state, scale, shift, in_shape)
            known = "(eval): affine" if isinstance(op, BATCH_NORMS) else "known per-unit scale"
            result.notes.append(f"{type(op).__name__} {known}, inverted")
        elif kind == "batchnorm-train":
            result.upper_bound |= _batchnorm_train(index, op, state, truth, in_shape, result.notes)
        elif kind == "linear":
            _linear(op, state, np.zeros(in_shape), in_shape)
            result.notes.append(f"{type(op).__name__}: linear constraints on its input")
        elif kind == "maxpool":
            if truth is None:
                raise AttackError(
                    f"{describe(index, op)}: the server does not know which input won each pooling window, "
                    "so dL/dz and the weight constraints below it are hidden; the security report's rank "
                    "assumes the winners known (an upper bound on leakage); use an optimisation attack"
                )
            _linear(op, state, truth, in_shape)
            result.notes.append(f"{type(op).__name__}: winners assumed known (upper bound on leakage)")
            result.upper_bound = True
        else:
            raise AttackError(f"{describe(index, op)} is not treated layer-wise")
        state.shape = tuple(in_shape)
    result.k = state.k
    result.constraints = OutputConstraints(
        state.mask.ravel(),
        np.where(state.mask, state.values, 0.0).ravel(),
        state.linear,
        state.rhs,
        state.extra_z,
        state.extra_scale,
        state.extra_names,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Elementwise ops
# ---------------------------------------------------------------------------------------------


def _torch_eval(op: nn.Module, v: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return op(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))).numpy()


def _derivative(op: nn.Module, v: np.ndarray) -> np.ndarray:
    """sigma'(v) of an elementwise op, by autograd."""
    if isinstance(op, CLIPPED_ACTIVATIONS):
        return activation_derivative(op, v)
    vt = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).requires_grad_(True)
    (d,) = torch.autograd.grad(op(vt).sum(), vt)
    return d.numpy()


def _invert_increasing(op: nn.Module, u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """v in [lo, hi] with op(v) = u, for op increasing on [lo, hi] (bisection to float64 precision)."""
    lo, hi = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        below = _torch_eval(op, mid) < u
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        if np.all(hi - lo <= 1e-15 * np.maximum(np.abs(hi), 1.0)):
            break
    return 0.5 * (lo + hi)


def _invert_monotone(op: nn.Module, u: np.ndarray) -> np.ndarray:
    if isinstance(op, CLIPPED_ACTIVATIONS):
        return invert_activation(op, u)
    if isinstance(op, (nn.ELU, nn.CELU)):
        alpha = float(op.alpha)
        scale = alpha if isinstance(op, nn.ELU) else 1.0
        neg = np.clip(u, -alpha + 1e-12 * alpha, 0.0)
        return np.where(u > 0, u, scale * np.log1p(neg / alpha))
    # Softplus: u >= max(v, 0) and u <= max(v, 0) + log(2) / beta
    beta = float(op.beta)
    return _invert_increasing(op, u, np.minimum(u, 0.0) - 50.0 / beta, u + 1.0)


def _unknown_off_mask(state: _State) -> bool:
    return bool(np.any(state.k[~state.mask] != 0))


def _elementwise(index: int, op: nn.Module, state: _State, truth: np.ndarray | None) -> None:
    if state.linear is not None:
        raise AttackError(
            f"{describe(index, op)} is followed by a linear op (pooling): its output is known only through "
            "nonlinear constraints on its input; not treated layer-wise"
        )
    v = np.where(state.mask, _invert_monotone(op, np.where(state.mask, state.values, 0.0)), 0.0)
    if _unknown_off_mask(state):
        if truth is None:
            raise AttackError(f"{describe(index, op)}: its input is hidden where dL/d(output) is not zero")
        v = np.where(state.mask, v, truth.reshape(v.shape))
    state.k = state.k * _derivative(op, v)
    state.values = v


def _branch(index: int, op: nn.Module, state: _State, truth: np.ndarray | None, notes: list[str]) -> bool:
    """GELU / SiLU: unique preimage for outputs >= 0; the branch of negative outputs (see doc)."""
    if state.linear is not None:
        raise AttackError(
            f"{describe(index, op)} is followed by a linear op (pooling): nonlinear constraints; not treated"
        )
    v_min = BRANCH_ACTIVATIONS[type(op)]
    u = np.where(state.mask, state.values, 0.0)
    negative = state.mask & (u < 0)
    v = _invert_increasing(
        op, np.maximum(u, _torch_eval(op, np.array(v_min))), np.full(u.shape, v_min), u + 1.0
    )
    name = type(op).__name__
    count = int(negative.sum())
    known = truth is not None
    if known:
        v = np.where(negative | ~state.mask, truth.reshape(u.shape), v)
    elif _unknown_off_mask(state):
        raise AttackError(f"{describe(index, op)}: its input is hidden where dL/d(output) is not zero")
    branch = "the true branch taken (upper bound)" if known else f"the branch z > {v_min:g} assumed"
    notes.append(f"{name}: {count} negative outputs have two preimages, {branch}")
    state.k = state.k * _derivative(op, v)
    state.values = np.where(state.mask, v, 0.0)
    return known and count > 0


def _masking(
    index: int,
    op: nn.Module,
    kind: str,
    state: _State,
    truth: np.ndarray | None,
    truth_out: np.ndarray | None,
    zero_rtol: float,
    notes: list[str],
) -> bool:
    """ReLU (outputs > 0 known, dL/dz = 0 at zero) and train-mode Dropout (zeros: dropped)."""
    name = type(op).__name__
    keep = 1.0 - float(op.p) if kind == "dropout" else 1.0
    u = np.where(state.mask, state.values, 0.0)
    scale = float(np.abs(u).max()) if state.mask.any() else 0.0
    tol = 0.0 if truth is not None else zero_rtol * scale
    if truth is None and kind == "relu" and (state.mask & (u < 0)).any():
        # A ReLU output is never negative: negative reconstructed values are noise (e.g. float32
        # rounding of a weight delta), and true zeros scatter as far on the positive side; the
        # margin covers the positive tail (a few zeros exceeded 1x on weight deltas at lr 0.1).
        tol = max(tol, RELU_NOISE_MARGIN * float(-u[state.mask].min()))
    passed = state.mask & ((u > tol) if kind == "relu" else (np.abs(u) > tol))
    hidden = state.linear is not None or _unknown_off_mask(state)
    upper = False
    if hidden:
        if truth is None or truth_out is None:
            raise AttackError(
                f"{describe(index, op)}: which entries pass is hidden by the op above (e.g. pooling "
                "mixes them before the server sees them), so dL/dz is unknown; the security report "
                "assumes the pattern known (an upper bound on leakage); use an optimisation attack"
            )
        pattern = (truth.reshape(u.shape) > 0) if kind == "relu" else (truth_out.reshape(u.shape) != 0)
        passed = passed | (~state.mask & pattern)
        if state.linear is not None:
            state.linear = sp.csr_matrix(state.linear @ sp.diags(pattern.ravel() / keep))
        inactive = int((~state.mask & ~pattern).sum())
        notes.append(
            f"{name}: pattern under the op above assumed known, {inactive} of {u.size} inactive "
            "(upper bound on leakage)"
        )
        upper = True
    zeros = int((state.mask & ~passed).sum())
    if state.mask.any():
        notes.append(
            f"{name}: {zeros} of {u.size} outputs at zero give no weight equations (dL/dz = 0 there)"
        )
    state.k = np.where(passed, state.k / keep, 0.0)
    state.mask = state.mask & passed
    state.values = np.where(state.mask, u * keep, 0.0)
    return upper


# ---------------------------------------------------------------------------------------------
# Affine and linear ops
# ---------------------------------------------------------------------------------------------


def _batchnorm_affine(op: nn.Module, batch: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) of BatchNorm: running statistics, or those of `batch`."""
    if batch is None:
        mean = op.running_mean.detach().double().numpy()
        var = op.running_var.detach().double().numpy()
    else:
        axes = tuple(range(1, batch.ndim))
        mean, var = batch.mean(axis=axes), batch.var(axis=axes)
    gamma = op.weight.detach().double().numpy() if op.affine else np.ones_like(mean)
    beta = op.bias.detach().double().numpy() if op.affine else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + op.eps)
    return scale, beta - scale * mean


def _declares_unit_scale(op: nn.Module) -> bool:
    """A module that states its per-channel scale (`unit_scale()`, e.g. the DAM gate)."""
    return callable(getattr(op, "unit_scale", None))


def _known_affine(op: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) of an op the server knows as affine: eval BatchNorm, or a module
    that declares its per-channel scale (`unit_scale()`, no shift)."""
    if _declares_unit_scale(op):
        scale = op.unit_scale().detach().double().numpy()
        return scale, np.zeros_like(scale)
    return _batchnorm_affine(op, None)


def _channelwise(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(values.reshape(-1, *([1] * (len(shape) - 1))), shape)


def _affine(state: _State, scale: np.ndarray, shift: np.ndarray, in_shape: tuple[int, ...]) -> None:
    """u = a * v + c per channel (axis 0): invert the known entries, rescale k and T."""
    state.reshape(in_shape)
    a, c = _channelwise(scale, in_shape), _channelwise(shift, in_shape)
    invertible = a != 0
    state.values = np.where(state.mask & invertible, (state.values - c) / np.where(invertible, a, 1.0), 0.0)
    state.mask = state.mask & invertible
    state.k = state.k * a
    if state.linear is not None:
        state.rhs = state.rhs - state.linear @ c.ravel()
        state.linear = sp.csr_matrix(state.linear @ sp.diags(a.ravel()))


def _batchnorm_train(
    index: int,
    op: nn.Module,
    state: _State,
    truth: np.ndarray | None,
    in_shape: tuple[int, ...],
    notes: list[str],
) -> bool:
    """Batch statistics unknown: the attack declines; the report adds them as extra unknowns."""
    name = type(op).__name__
    if truth is None:
        raise AttackError(
            f"{describe(index, op)} normalises with the batch's own mean and variance (train mode), "
            "which the server does not know; layer-wise inversion needs the model in eval mode (the "
            "security report counts them as extra unknowns); use an optimisation attack"
        )
    truth = truth.reshape(in_shape)
    upper = not bool(state.mask.all())
    k_out = torch.from_numpy(state.k.reshape(1, *in_shape).copy())
    gamma = op.weight.detach().double() if op.affine else None
    beta = op.bias.detach().double() if op.affine else None

    def normalise(v: Tensor) -> Tensor:
        return F.batch_norm(v, None, None, gamma, beta, True, 0.0, op.eps)

    _, back = vjp(normalise, torch.from_numpy(truth[None].copy()))
    k_in = back(k_out)[0][0].numpy()
    scale, shift = _batchnorm_affine(op, truth[None])
    _affine(state, scale, shift, in_shape)
    state.k = k_in
    channels = in_shape[0]
    centred = truth - _channelwise(truth.reshape(channels, -1).mean(axis=1), in_shape)
    extra = np.zeros((truth.size, 2 * channels))
    for c in range(channels):
        plane = np.zeros(in_shape)
        plane[c] = centred[c]
        extra[:, c] = plane.ravel()
        plane = np.zeros(in_shape)
        plane[c] = 1.0
        extra[:, channels + c] = plane.ravel()
    state.extra_z = extra
    state.extra_scale = tuple(range(channels)) + (-1,) * channels
    state.extra_names = tuple(f"scale[{c}]" for c in range(channels)) + tuple(
        f"mean[{c}]" for c in range(channels)
    )
    notes.append(
        f"{name} (train): batch mean and variance of {channels} channels unknown, {2 * channels} extra "
        "unknowns (input determined at best up to scale)"
        + (" (upper bound: dL/dz where the op above hides its input assumed known)" if upper else "")
    )
    return upper


def op_jacobian(op: nn.Module, point: np.ndarray) -> sp.csr_matrix:
    """d op / d input at `point` (one sample, no batch dim), sparse (n_out x n_in), by vjp probes."""
    v = torch.from_numpy(np.ascontiguousarray(point, dtype=np.float64))[None]
    out, back = vjp(op, v)
    n_out, n_in = out.numel(), v.numel()
    block = max(1, min(n_out, PROBE_ENTRIES // max(n_out, n_in)))
    rows, cols, vals = [], [], []
    for start in range(0, n_out, block):
        stop = min(start + block, n_out)
        basis = torch.zeros((stop - start, n_out), dtype=torch.float64)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        (jt,) = vmap(back)(basis.reshape(stop - start, *out.shape))
        block_rows = jt.reshape(stop - start, n_in).numpy()
        i, j = np.nonzero(block_rows)
        rows.append(i + start)
        cols.append(j)
        vals.append(block_rows[i, j])
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in)
    )


def _linear(op: nn.Module, state: _State, point: np.ndarray, in_shape: tuple[int, ...]) -> None:
    """u = L v (+ c), L the op's Jacobian at `point` (exact for linear ops; for max pooling the
    selection of the winners at the true input). Known entries of u become rows of T; rows of T
    that touch one entry of v alone fix that entry."""
    jac = op_jacobian(op, point.reshape(in_shape))
    offset = _torch_eval(op, np.zeros((1, *in_shape)))[0].ravel() if not isinstance(op, MAX_POOLS) else 0.0
    u = state.values.ravel()
    known = state.mask.ravel()
    blocks = [jac[known]]
    rhs = [u[known] - (offset[known] if np.ndim(offset) else 0.0)]
    if state.linear is not None:
        blocks.append(sp.csr_matrix(state.linear @ jac))
        rhs.append(state.rhs - (state.linear @ offset if np.ndim(offset) else 0.0))
    k = jac.T @ state.k.ravel()
    t = sp.vstack(blocks, format="csr")
    r = np.concatenate(rhs)
    mask = np.zeros(int(np.prod(in_shape)), dtype=bool)
    values = np.zeros(mask.size)
    nonempty = np.diff(t.indptr) > 0  # rows a padding op fills with zeros say nothing
    t, r = t[nonempty], r[nonempty]
    single = np.diff(t.indptr) == 1
    if single.any():
        rows = np.flatnonzero(single)
        cols = t.indices[t.indptr[rows]]
        coef = t.data[t.indptr[rows]]
        mask[cols] = True
        values[cols] = r[rows] / coef
        t, r = t[~single], r[~single]
    state.linear, state.rhs = (t, r) if t.shape[0] else (None, None)
    state.k = k.reshape(in_shape)
    state.mask = mask.reshape(in_shape)
    state.values = values.reshape(in_shape)
    state.shape = tuple(in_shape)
