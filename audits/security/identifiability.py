"""End-to-end identifiability: which input directions the observed gradient sees, for any model.

The server observes h(x) = vec(∇θ L(x, y)), the gradient of every trainable parameter at the
client's sample(s), possibly clipped to norm C and, when its noise is known per coordinate,
whitened by it. The Jacobian J = ∂h/∂x (#gradient coordinates P × #inputs D) says what a
gradient-matching attacker can see to first order: directions in its null space are invisible,
so its numerical rank deficit counts them, and its singular values feed the Cramér–Rao bound of
`audits.security.leakage_bound`. Unlike the layer-wise metric (`audits.security.metric`) this needs no
flat layer list: residual blocks, BatchNorm, pooling and gates are differentiated through as
they are. Token models are differentiated with respect to their embedded input
(`ZooModel.embed` / `forward_embedded`).

Three ways to get the spectrum (`method="auto"` picks by size):

* "dense": J formed chunk by chunk from vmapped forward-over-reverse products (jvp of the
  gradient), then its SVD. Needs P·D float64 numbers in memory.
* "gram": JᵀJ (D × D) assembled column by column from vmapped products Jᵀ(J v): J v by forward
  over reverse mode (a jvp of the gradient), Jᵀ u by reverse over forward mode (the input gradient
  of L's derivative along u in parameter space); J itself is never held. Products run in float32;
  the Gram is accumulated and decomposed in float64.
* "randomized": block subspace iteration on JᵀJ (Halko, Martinsson & Tropp 2011, algorithms 4.4
  and 5.3) with k random start vectors: the k largest singular values, a Hutchinson estimate of
  ‖J‖_F², and the exact count of inputs whose column of J is zero. It does not estimate the rank:
  certifying that the smallest singular value is not zero costs as much as the Gram.

The Gram's numerical rank uses a tolerance read off the Gram itself: JᵀJ is symmetric, so the
asymmetry ‖G − Gᵀ‖₂ of the assembled G measures the rounding in its products. Eigenvalues below
it are recomputed from float64 products on a subspace holding their eigenvectors (on CNN6 at
32×32, 43 of 3,072, which float32 alone would have counted as a deficit).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.base import ZooModel, model_label

METHODS = ("auto", "dense", "gram", "randomized")
# "auto" forms J densely while it takes at most this many bytes in float64 ...
MAX_DENSE_BYTES = 256 * 2**20
# ... assembles the Gram while D stays below this (a 8192² float64 Gram is 512 MiB) and P·D below
# GRAM_WORK (a proxy for the products' cost: CNN6 at 32×32 is 4.7e8; a ResNet-18 at 32×32, 3.4e10,
# would take hours on two cores) ...
MAX_GRAM_INPUTS = 8192
GRAM_WORK = 4e9
# ... and otherwise estimates the top of the spectrum with this many random vectors and power steps.
RANDOMIZED_RANK = 64
POWER_STEPS = 2
OVERSAMPLE = 8  # extra random vectors beyond the k reported (Halko et al.'s p)
# Tangents per vmapped product: as many as keep one chunk of J's columns within CHUNK_BYTES, in
# MIN_CHUNK..MAX_CHUNK, split evenly (each new chunk shape costs a warm-up of oneDNN's kernels).
# Measured on CNN6 at 32x32, two busy cores: chunks of 256-512 took 10 s for the 3072 products,
# of 128 three to eight times longer, of 870 one and a half to two times longer.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK = 16
MAX_CHUNK = 512

# Threads for the dense linear algebra (eigvalsh, Cholesky, QR, SVD). Measured on the 2-core dev
# machine with the other core busy: eigvalsh of a 768 x 768 Gram took 0.07 s on one thread and
# 4-6 s on two, of a 3072 x 3072 one 1.4 s and 7 s (MKL's threads wait on each other).
LINALG_THREADS = 1

DENSE_RULE = "s_i > max(P, D) * eps * s_max (numpy's matrix_rank rule, eps of the product dtype)"
# The Gram's rounding error, estimated from its asymmetry, is multiplied by this margin: measured
# on CNN6, LeNet and resnet-mini (float32 products against float64 ones), the error of the
# symmetrised Gram was 0.5 to 2 times the spectral norm of its asymmetry.
ASYMMETRY_MARGIN = 4.0
# The forward-mode check.s tolerance on ‖Jᵀu − Jᵀu_reference‖ / ‖Jᵀu_reference‖: float32 rounding stays
# near 1e-6, the forward-mode defect it guards against was 0.37.
FORWARD_MODE_RTOL = 1e-3
FORWARD_MODE_PAIRS = 4
GRAM_RULE = (
    f"s_i^2 > max({ASYMMETRY_MARGIN:g} * ||G - G^T||_2, D * eps64 * s_max^2) on the assembled Gram "
    "G = J^T J (its asymmetry measures the rounding in its products)"
)
REFINED_RULE = (
    "float32 Gram G; its eigenvalues below {margin:g} * ||G - G^T||_2 ({count} of them) recomputed by "
    "float64 Rayleigh-Ritz (B = V^T J^T J V) on a subspace V of 2m + 8 vectors holding their "
    "eigenvectors (shift-invert subspace iteration on G); s_i^2 > max({margin:g} * ||B - B^T||_2, "
    "D * eps64 * s_max^2)"
)
RANDOMIZED_RULE = "rank not estimated; unseen inputs: rows of J^T J Omega that are exactly zero"


@dataclass(frozen=True)
class Identifiability:
    """The spectrum of J = d vec(observed gradient) / d input at one batch of samples.

    unknowns: D, the input coordinates (embedded coordinates for token models), over the batch.
    parameters: P, the observed gradient coordinates (trainable parameters).
    rank, deficit: numerical rank of J and D − rank; None where the method cannot certify it.
    unseen_inputs: inputs whose column of J is exactly zero (no gradient coordinate depends on
        them; a lower bound on the deficit that every method counts exactly).
    singular_values: descending, float64; all D of them when `complete`, else the top k.
    frobenius_sq: ‖J‖_F² = tr(JᵀJ) (a Hutchinson estimate when not `complete`).
    tolerance: the absolute threshold on singular values that gave the rank (0 where none).
    whitened: J was scaled row by row by 1 / (known noise std) before the analysis.
    clip_norm: J is that of the gradient clipped to this L2 norm (None: not clipped).
    """

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    unknowns: int
    parameters: int
    rank: int | None
    deficit: int | None
    unseen_inputs: int
    singular_values: np.ndarray
    complete: bool
    frobenius_sq: float
    tolerance: float
    tolerance_rule: str
    method: str
    dtype: str
    whitened: bool
    clip_norm: float | None
    seconds: float
    cost: str

    @property
    def identified(self) -> np.ndarray:
        """The singular values above the tolerance (the top k for the randomized method)."""
        return self.singular_values[self.singular_values > self.tolerance]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["singular_values"] = [float(s) for s in self.singular_values]
        return out


def identifiability(
    model: ZooModel,
    inputs: Tensor,
    labels: Tensor,
    method: str = "auto",
    *,
    noise_std: Mapping[str, Tensor] | None = None,
    clip_norm: float | None = None,
    dtype: torch.dtype | None = None,
    chunk: int | None = None,
    top_k: int = RANDOMIZED_RANK,
    power_steps: int = POWER_STEPS,
    threads: int | None = None,
    seed: int = 0,
) -> Identifiability:
    """The rank and singular spectrum of d vec(grad_theta L(x, y)) / dx at `inputs` (B, *shape).

    labels: dataset labels (the model's `targets` turns them into what the loss takes).
    noise_std: per-parameter std of the observed gradient's noise (e.g.
        `ObservedUpdate.gradient_noise`); J's rows are divided by it (the whitened Jacobian
        Σ^{-1/2} J, whose JᵀJ is the Fisher information under that noise).
    clip_norm: analyse the gradient clipped to this L2 norm, g · min(1, C / ‖g‖), as update
        clipping (and DP-SGD's per-sample clipping at batch 1) sends it.
    dtype: precision of the products. None: float64 for "dense"; float32 for "gram", whose
        uncertain bottom eigenvalues are then recomputed with float64 products (three times
        slower on CPU, where float64 convolutions have no oneDNN kernels), except for a whitened
        J, whose spectrum spans too many decades for float32 (on CNN6 more than half of the
        eigenvalues came out uncertain): float64 throughout; float32 for "randomized".
    chunk: tangents per vmapped product (None: sized by CHUNK_BYTES).
    threads: torch threads while computing (None: leave the process setting).
    The model's mode is kept (a BatchNorm in training mode normalises with the batch's
    statistics, as a client's training step does); the model itself is not modified.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if (chunk is not None and chunk < 1) or top_k < 1 or power_steps < 0:
        raise ValueError("chunk and top_k must be at least 1 and power_steps at least 0")
    with _analysis_settings(threads):
        start = time.perf_counter()

        def observed_in(precision: torch.dtype) -> _ObservedGradient:
            return _ObservedGradient(model, inputs, labels, precision, noise_std, clip_norm)

        observed = observed_in(torch.float32)
        size, params = observed.unknowns, observed.parameters
        chosen = method if method != "auto" else _auto_method(size, params)
        whitened_gram = chosen == "gram" and noise_std is not None
        dtype = dtype or (torch.float64 if chosen == "dense" or whitened_gram else torch.float32)
        if dtype != torch.float32:
            observed = observed_in(dtype)
        chunk = chunk or _even_chunk(size, params * torch.finfo(dtype).bits // 8)
        if chosen == "dense":
            values, rule, tol, unseen, cost = _dense(observed, chunk)
        elif chosen == "gram":
            exact = None if dtype == torch.float64 else (lambda: observed_in(torch.float64))
            values, rule, tol, unseen, cost = _gram(observed, chunk, exact)
        else:
            values, rule, tol, unseen, cost = _randomized(
                observed, min(top_k, size), power_steps, seed, chunk
            )
        complete = chosen != "randomized"
        rank = int((values > tol).sum()) if complete else None
        frobenius = float((values**2).sum()) if complete else observed.trace_estimate
        return Identifiability(
            model=model_label(model),
            input_shape=tuple(int(d) for d in inputs.shape[1:]),
            batch_size=int(inputs.shape[0]),
            unknowns=size,
            parameters=params,
            rank=rank,
            deficit=None if rank is None else size - rank,
            unseen_inputs=unseen,
            singular_values=values,
            complete=complete,
            frobenius_sq=frobenius,
            tolerance=tol,
            tolerance_rule=rule,
            method=chosen,
            dtype=str(dtype).removeprefix("torch."),
            whitened=noise_std is not None,
            clip_norm=clip_norm,
            seconds=time.perf_counter() - start,
            cost=cost,
        )


def observed_jacobian(
    model: ZooModel,
    inputs: Tensor,
    labels: Tensor,
    *,
    noise_std: Mapping[str, Tensor] | None = None,
    clip_norm: float | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int = 256,
) -> Tensor:
    """J itself, (P, D): what the "dense" method decomposes, for small models and checks. Rows
    follow `model.named_parameters()` (trainable ones, each flattened), columns the embedded input."""
    observed = _ObservedGradient(model, inputs, labels, dtype, noise_std, clip_norm)
    return _jacobian(observed, chunk)


def fisher_gram(
    model: ZooModel,
    inputs: Tensor,
    labels: Tensor,
    *,
    noise_std: Mapping[str, Tensor] | None = None,
    clip_norm: float | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """JᵀJ, (D, D) in float64 and symmetrised: the Fisher information of the input at unit noise,
    as a matrix, for bounds that combine it with a prior (`audits.security.leakage_bound.prior_bound`).
    Costs what the float64 "gram" method costs, without the eigendecomposition."""
    with _analysis_settings(threads):
        observed = _ObservedGradient(model, inputs, labels, torch.float64, noise_std, clip_norm)
        chunk = _even_chunk(observed.unknowns, observed.parameters * 8)
        gram = torch.empty(observed.unknowns, observed.unknowns, dtype=torch.float64)
        for begin, basis in _basis_chunks(observed.unknowns, chunk, torch.float64):
            gram[begin : begin + len(basis)] = observed.gram_columns(basis)
        return ((gram + gram.T) / 2).numpy()


def _even_chunk(size: int, bytes_per_tangent: int) -> int:
    limit = min(MAX_CHUNK, max(MIN_CHUNK, CHUNK_BYTES // bytes_per_tangent))
    count = math.ceil(size / limit)
    return math.ceil(size / count)


def _auto_method(size: int, params: int) -> str:
    if size * params * 8 <= MAX_DENSE_BYTES:
        return "dense"
    if size <= MAX_GRAM_INPUTS and size * params <= GRAM_WORK:
        return "gram"
    return "randomized"


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _analysis_settings(threads: int | None) -> Iterator[None]:
    """Torch threads, and attention on kernels that forward-mode AD can differentiate: the fused
    CPU kernels of scaled-dot-product attention and of TransformerEncoderLayer's inference fast
    path have no forward derivative (the cloze transformer's J failed with NotImplementedError).
    The math kernels compute the same function."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _torch_threads(threads), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class _LossOfEmbedded(nn.Module):
    """model.loss(model.forward_embedded(model.embed(raw) + delta), targets): the loss as a
    function of a perturbation `delta` of the embedded input, so that parameters used by `embed`
    (an embedding table) keep their gradient while the derivative is taken at the embedding."""

    def __init__(self, model: ZooModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, delta: Tensor, raw: Tensor, targets: Tensor) -> Tensor:
        embedded = self.model.embed(raw)
        return self.model.loss(self.model.forward_embedded(embedded + delta), targets)


class _ObservedGradient:
    """h(delta): the flat observed gradient at the embedded input plus `delta`, with J v, Jᵀ u
    and JᵀJ v products on it (delta = 0 is the client's sample)."""

    def __init__(
        self,
        model: ZooModel,
        inputs: Tensor,
        labels: Tensor,
        dtype: torch.dtype,
        noise_std: Mapping[str, Tensor] | None,
        clip_norm: float | None,
    ) -> None:
        net = _functional_copy(model, dtype)
        self.loss_module = _LossOfEmbedded(net)
        self.raw = inputs.detach().to(dtype) if inputs.is_floating_point() else inputs.detach()
        self.targets = model.sample_targets(inputs.detach(), labels.detach())
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = {f"model.{n}": p.detach() for n, p in named}
        with torch.no_grad():
            embedded = net.embed(self.raw)
        if not embedded.is_floating_point():
            raise ValueError(
                f"{type(model).__name__}.embed returned {embedded.dtype}; a model with discrete "
                "inputs must override embed/forward_embedded to expose a continuous input"
            )
        self.zero = torch.zeros_like(embedded, dtype=dtype)
        self.unknowns = int(self.zero.numel())
        self.parameters = sum(p.numel() for _, p in named)
        self.clip_norm = clip_norm
        self.row_scale = None if noise_std is None else _inverse_std(noise_std, named, dtype)
        self.trace_estimate = float("nan")
        self._gradient: Tensor | None = None  # the unclipped, unscaled gradient at the sample
        self._forward_mode_exact: bool | None = None  # forward-mode Jᵀu matched reverse mode

    def __call__(self, delta: Tensor) -> Tensor:
        def loss(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self.loss_module, params, (delta, self.raw, self.targets))

        grads = grad(loss)(self.params)
        flat = torch.cat([grads[f"model.{n}"].reshape(-1) for n in self.names])
        if self.clip_norm is not None:
            flat = flat * torch.clamp(self.clip_norm / flat.norm(), max=1.0)
        if self.row_scale is not None:
            flat = flat * self.row_scale
        return flat

    def jacobian_columns(self, tangents: Tensor) -> Tensor:
        """J V for V = tangents (k, D): (k, P)."""

        def column(v: Tensor) -> Tensor:
            return jvp(self, (self.zero,), (v.view_as(self.zero),))[1]

        with warnings.catch_warnings():
            # torch loads its forward-mode decompositions with torch.jit.script on first use.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            return vmap(column, randomness="same")(tangents)

    def transposed_products(self, cotangents: Tensor) -> Tensor:
        """Jᵀ U for U = cotangents (k, P): (k, D).

        With g = ∇θ L, Jᵀu = ∇x (∇θ L · u) = ∇x of the directional derivative of L along u in
        parameter space: reverse mode over one forward-mode pass. Measured on CNN6, six times
        faster than reverse over reverse (a vjp of the gradient map). Whitening and clipping
        act on u first, as the transposes of their (symmetric) Jacobians. torch's forward mode
        is not exact everywhere (vmapped through a training-mode BatchNorm, Jᵀu was off by 37 %),
        so the first call compares it with reverse over reverse and keeps that one if they differ."""
        if self._forward_mode_exact is None:
            self._forward_mode_exact = self._check_forward_mode()
        if not self._forward_mode_exact:
            return self._reverse_transposed_products(cotangents)
        return self._forward_transposed_products(cotangents)

    def _check_forward_mode(self) -> bool:
        """Forward-over-reverse Jᵀu against reverse over reverse for seeded cotangents vmapped
        together, as in use (the defect showed only with more than one): equal to FORWARD_MODE_RTOL."""
        generator = torch.Generator().manual_seed(0)
        cotangents = torch.randn(FORWARD_MODE_PAIRS, self.parameters, generator=generator).to(self.zero.dtype)
        fast = self._forward_transposed_products(cotangents)
        exact = self._reverse_transposed_products(cotangents)
        return bool((fast - exact).norm() <= FORWARD_MODE_RTOL * exact.norm())

    def _reverse_transposed_products(self, cotangents: Tensor) -> Tensor:
        """Jᵀ U by a vjp of the whole observed map (whitening and clipping included)."""
        _, pull_back = vjp(self, self.zero)
        return vmap(lambda u: pull_back(u)[0].reshape(-1))(cotangents)

    def _forward_transposed_products(self, cotangents: Tensor) -> Tensor:
        if self.row_scale is not None:
            cotangents = cotangents * self.row_scale
        if self.clip_norm is not None:
            cotangents = self._clip_transpose(cotangents)

        def row(u: Tensor) -> Tensor:
            direction = self._unflatten(u)

            def along(delta: Tensor) -> Tensor:
                def loss(params: dict[str, Tensor]) -> Tensor:
                    return functional_call(self.loss_module, params, (delta, self.raw, self.targets))

                return jvp(loss, (self.params,), (direction,))[1]

            return grad(along)(self.zero).reshape(-1)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
            return vmap(row, randomness="same")(cotangents)

    def gram_columns(self, tangents: Tensor) -> Tensor:
        """JᵀJ V for V = tangents (k, D): (k, D)."""
        return self.transposed_products(self.jacobian_columns(tangents))

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, begin = {}, 0
        for name in self.names:
            param = self.params[f"model.{name}"]
            out[f"model.{name}"] = flat[begin : begin + param.numel()].view_as(param)
            begin += param.numel()
        return out

    def _clip_transpose(self, cotangents: Tensor) -> Tensor:
        """The clip's Jacobian at g, applied to each row: (C/‖g‖)(I − ĝĝᵀ) when ‖g‖ > C, else I."""
        if self._gradient is None:
            with torch.no_grad():
                self._gradient = _unclipped(self)
        norm = self._gradient.norm()
        if not norm > self.clip_norm:
            return cotangents
        unit = self._gradient / norm
        return (self.clip_norm / norm) * (cotangents - (cotangents @ unit)[:, None] * unit)


def _unclipped(observed: _ObservedGradient) -> Tensor:
    def loss(params: dict[str, Tensor]) -> Tensor:
        return functional_call(observed.loss_module, params, (observed.zero, observed.raw, observed.targets))

    grads = grad(loss)(observed.params)
    return torch.cat([grads[f"model.{n}"].reshape(-1) for n in observed.names])


def _functional_copy(model: ZooModel, dtype: torch.dtype) -> ZooModel:
    """A copy in `dtype` that torch.func can differentiate, as a function of the input alone:
    dropout is off (in training mode every product would draw its own mask, the Gram came out
    asymmetric and its tolerance swallowed the whole spectrum: rank 0 for the cloze transformer
    and ULMFiT); the server cannot know a client's masks, so J is that of the expected network. A
    BatchNorm in training mode keeps normalising with the batch's statistics but no longer writes
    running statistics (an in-place update of a shared buffer cannot be batched by vmap)."""
    net = copy.deepcopy(model).to(dtype)
    batch_norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    net.eval()
    for module in batch_norms:
        module.train()
        module.track_running_stats = False
        module.running_mean = None
        module.running_var = None
        module.num_batches_tracked = None
    return net


def _inverse_std(
    noise_std: Mapping[str, Tensor], named: list[tuple[str, nn.Parameter]], dtype: torch.dtype
) -> Tensor:
    missing = [n for n, _ in named if n not in noise_std]
    if missing:
        raise ValueError(f"noise_std lacks parameters {missing[:3]}; give one std tensor per parameter")
    stds = []
    for name, param in named:
        std = torch.as_tensor(noise_std[name]).to(dtype)
        if std.shape != param.shape or not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
            raise ValueError(
                f"noise_std[{name!r}] must be positive and finite, shaped like the parameter "
                f"{tuple(param.shape)}"
            )
        stds.append(std.reshape(-1))
    return 1.0 / torch.cat(stds)


def _basis_chunks(size: int, chunk: int, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    for begin in range(0, size, chunk):
        end = min(begin + chunk, size)
        basis = torch.zeros(end - begin, size, dtype=dtype)
        basis[torch.arange(end - begin), torch.arange(begin, end)] = 1.0
        yield begin, basis


def _jacobian(observed: _ObservedGradient, chunk: int) -> Tensor:
    jac = torch.empty(observed.parameters, observed.unknowns, dtype=torch.float64)
    for begin, basis in _basis_chunks(observed.unknowns, chunk, observed.zero.dtype):
        jac[:, begin : begin + len(basis)] = observed.jacobian_columns(basis).T.double()
    return jac


def _dense(observed: _ObservedGradient, chunk: int) -> tuple[np.ndarray, str, float, int, str]:
    size, params = observed.unknowns, observed.parameters
    dtype = observed.zero.dtype
    jac = _jacobian(observed, chunk)
    with _torch_threads(LINALG_THREADS):
        values = torch.linalg.svdvals(jac).numpy()
    unseen = int((jac == 0).all(dim=0).sum())
    eps = float(torch.finfo(dtype).eps)
    tol = max(params, size) * eps * float(values[0]) if len(values) else 0.0
    cost = f"{size} Jv products (jvp of the gradient) in chunks of {chunk}, SVD of a {params} x {size} J"
    return values.astype(np.float64), DENSE_RULE, tol, unseen, cost


def _gram(
    observed: _ObservedGradient, chunk: int, exact: Callable[[], _ObservedGradient] | None
) -> tuple[np.ndarray, str, float, int, str]:
    """Eigenvalues of the assembled JᵀJ; with `exact` (a float64 gradient map), those that the
    products' rounding leaves uncertain are recomputed in float64 on their eigenvectors."""
    size = observed.unknowns
    dtype = observed.zero.dtype
    gram = torch.empty(size, size, dtype=torch.float64)
    for begin, basis in _basis_chunks(size, chunk, dtype):
        gram[begin : begin + len(basis)] = observed.gram_columns(basis).double()
    # Inputs no gradient coordinate depends on have exactly zero rows and columns: they are
    # null directions as they stand, and the eigenproblem is solved on the others.
    seen = ~(gram == 0).all(dim=1)
    unseen = size - int(seen.sum())
    inner = ((gram + gram.T) / 2)[seen][:, seen]
    cost = f"{size} J^T J v products (forward over reverse, then reverse over forward) in chunks of {chunk}"
    with _torch_threads(LINALG_THREADS):
        error = ASYMMETRY_MARGIN * _spectral_norm(gram - gram.T)
        eigen = torch.linalg.eigvalsh(inner)
    rule = GRAM_RULE
    uncertain = int((eigen < error).sum())
    if exact is not None and uncertain:
        # Rayleigh-Ritz in float64 on (a slightly larger) subspace of the uncertain eigenvectors:
        # its Ritz values bound the bottom eigenvalues from above, accurately when it holds them.
        width = 2 * uncertain + OVERSAMPLE
        # Past half the inputs the subspace iteration costs more than the float64 Gram itself.
        if 2 * width >= len(inner):
            vectors = torch.eye(len(inner), dtype=torch.float64)
        else:
            with _torch_threads(LINALG_THREADS):
                vectors = _bottom_subspace(inner, width, 2 * error)
        basis = torch.zeros(vectors.shape[1], size, dtype=torch.float64)
        basis[:, seen] = vectors.T
        projected = basis @ _gram_rows(exact(), basis, chunk).T
        with _torch_threads(LINALG_THREADS):
            error = ASYMMETRY_MARGIN * _spectral_norm(projected - projected.T)
            ritz = torch.linalg.eigvalsh((projected + projected.T) / 2)
        eigen = torch.sort(torch.cat([ritz[:uncertain], eigen[uncertain:]])).values
        rule = REFINED_RULE.format(margin=ASYMMETRY_MARGIN, count=uncertain)
        cost += f", {len(basis)} float64 products to recompute {uncertain} uncertain eigenvalues"
    eigen = torch.cat([eigen.flip(0).clamp(min=0.0), torch.zeros(unseen, dtype=torch.float64)]).numpy()
    cost += f", eigendecomposition of a {len(inner)} x {len(inner)} Gram"
    eps = float(torch.finfo(torch.float64).eps)
    floor = max(error, size * eps * float(eigen[0])) if len(eigen) else 0.0
    return np.sqrt(eigen).astype(np.float64), rule, float(np.sqrt(floor)), unseen, cost


def _bottom_subspace(matrix: Tensor, width: int, shift: float, steps: int = 12) -> Tensor:
    """An orthonormal basis (n, width) of the eigenvectors of the smallest eigenvalues of a
    symmetric `matrix`: subspace iteration with (matrix + shift I)^-1 through one Cholesky
    factorisation (D³/3 flops, a fraction of a full eigendecomposition's)."""
    size = len(matrix)
    identity = torch.eye(size, dtype=matrix.dtype)
    scale = float(matrix.diagonal().abs().max()) or 1.0
    shift = max(shift, 1e-14 * scale)
    factor, info = torch.linalg.cholesky_ex(matrix + shift * identity)
    while int(info) != 0:  # not positive definite yet: the rounding was larger than estimated
        shift *= 10
        factor, info = torch.linalg.cholesky_ex(matrix + shift * identity)
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(size, width, generator=generator, dtype=matrix.dtype)).Q
    for _ in range(steps):
        basis = torch.linalg.qr(torch.cholesky_solve(basis, factor)).Q
    return basis


def _gram_rows(observed: _ObservedGradient, vectors: Tensor, chunk: int) -> Tensor:
    """(JᵀJ V)ᵀ for the rows V of `vectors`, `chunk` at a time, in float64."""
    dtype = observed.zero.dtype
    return torch.cat([observed.gram_columns(part.to(dtype)).double() for part in vectors.split(chunk)])


def _orthonormal_rows(rows: Tensor) -> Tensor:
    with _torch_threads(LINALG_THREADS):
        return torch.linalg.qr(rows.T).Q.T


def _spectral_norm(matrix: Tensor, steps: int = 30) -> float:
    """‖A‖_2 by power iteration on AᵀA (seeded; D² work per step instead of an SVD's D³)."""
    if not bool(matrix.any()):
        return 0.0
    vector = torch.randn(matrix.shape[1], generator=torch.Generator().manual_seed(0), dtype=matrix.dtype)
    for _ in range(steps):
        vector = matrix.T @ (matrix @ vector)
        vector = vector / vector.norm()
    return float((matrix @ vector).norm())


def _randomized(
    observed: _ObservedGradient, rank: int, power_steps: int, seed: int, chunk: int
) -> tuple[np.ndarray, str, float, int, str]:
    size = observed.unknowns
    vectors = min(size, rank + OVERSAMPLE)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(vectors, size, generator=generator, dtype=torch.float64)
    image = _gram_rows(observed, omega, chunk)  # rows: (JᵀJ ω_j)ᵀ
    # E[ωᵀ JᵀJ ω] = tr(JᵀJ) for standard-normal ω (Hutchinson).
    observed.trace_estimate = float((omega * image).sum(dim=1).mean())
    # A row of JᵀJ is zero exactly when that input's column of J is; for a Gaussian Ω a non-zero
    # row gives a zero in every column of JᵀJΩ with probability 0.
    unseen = int((image == 0).all(dim=0).sum())
    for _ in range(power_steps):
        image = _gram_rows(observed, _orthonormal_rows(image), chunk)
    basis = _orthonormal_rows(image)
    projected = basis @ _gram_rows(observed, basis, chunk).T
    with _torch_threads(LINALG_THREADS):
        eigen = torch.linalg.eigvalsh((projected + projected.T) / 2).flip(0).clamp(min=0.0).numpy()[:rank]
    cost = (
        f"{vectors * (power_steps + 2)} J^T J v products ({vectors} random vectors, {power_steps} "
        f"power steps, Rayleigh-Ritz): top-{rank} singular values (Ritz values, each at most the "
        "true one), Hutchinson estimate of ||J||_F^2"
    )
    return np.sqrt(eigen).astype(np.float64), RANDOMIZED_RULE, 0.0, unseen, cost
