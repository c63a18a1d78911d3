"""Layer-wise gradient inversion (R-GAP, Zhu & Blaschko 2021; COPA, Chen & Campbell 2021).

For one sample (batch size 1) the attack walks the network from the output to the input. The
head gives the label, k = dL/dlogits and the head's input (`attacks.layerwise_head`). Then, for
each layer from the top down (`attacks.network_plan`: Linear, Conv1d/2d/3d, an Embedding at the
input), it

1. pulls the reconstruction above back through the ops in between (`attacks.layer_ops`):
   activations are inverted, z = sigma^{-1}(x_next), and k = (W_next^T k_next) * sigma'(z); a
   ReLU keeps the weight constraints of its positive outputs only and zeroes k elsewhere;
   BatchNorm (eval) is inverted; average pooling gives linear constraints T z = r. A Linear
   layer with bias uses its observed bias gradient, which *is* k; a conv bias gradient, sum of k
   over positions, is reported as a check. What the server cannot know - max-pool winners, a
   ReLU pattern under pooling, train-mode batch statistics - and modules without a pull-back
   (residual blocks, ...) make the attack decline with an AttackError naming the layer;
2. solves the stacked system [K; W; P] x = [vec(dL/dW); z - b; 0] (only the known rows of W, or
   T W, when the ops hide some) in the least-squares sense: plain Conv2d / Linear layers use the
   structured normal equations of `attacks.layerwise_systems` (float64, padding eliminated),
   every other case the autograd-built systems of `attacks.generic_systems`.
   With `system="auto"` (default) a layer whose gradient constraints alone determine x with
   good conditioning is solved from them alone - one small system shared by all input channels,
   as R-GAP does for FC layers - and the weight constraints are reported as a residual check.
   On CNN6 that is the four deeper convs; the first two need the stacked system.
3. corrects LeakyReLU derivative signs that noise flipped (near-zero pre-activations): an entry
   whose flip explains a significant part of the gradient residual is flipped and the layer
   re-solved (`LayerwiseInversion._fix_signs`; stacked layers re-solve by preconditioned CG).
   ReLU zeros are read with a noise-aware threshold instead (`attacks.layer_ops`).

Every layer's rank, deficit, residual and extreme singular values are reported: a rank-deficient
layer (e.g. CNN6-d's second conv) means the data is not determined by the gradient, and the
reconstruction below it is a minimum-norm guess. `hybrid=True` refines such layers by gradient
matching (COPA's hybrid, `attacks.layerwise_hybrid`).

Ambiguities (logistic head without bias only) are kept as hypotheses: wrong labels are dropped
when the layer below becomes inconsistent (relative residual > `keep_ratio` x the best); an
ambiguity that survives to the input (the two roots of the logistic equation on a bias-free,
positively homogeneous net give the same gradient up to an input scale) is resolved by the data
range prior `input_range`: least violation of the range, then the largest candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from attacks.generic_systems import bias_vector, constrained_residuals, constrained_solve
from attacks.layer_ops import RELU_ZERO_RTOL, pull_back
from attacks.layerwise_head import HeadHypothesis, cross_entropy_head, logistic_head
from attacks.layerwise_hybrid import HybridConfig, refine_layer
from attacks.layerwise_systems import (
    DEFAULT_BLAS_THREADS,
    RANK_RTOL,
    ConvGeometry,
    RankInfo,
    Resolver,
    apply_gradient,
    apply_weight,
    backprop_input,
    balance,
    blas_threads,
    build_system,
    output_gradient_fit,
    residuals,
    solve_gradient_only,
    solve_normal,
)
from attacks.network_plan import NetworkPlan, PlannedLayer, plan_network, weight_of
from models.base import ZooModel


@dataclass
class _Hypothesis:
    """One branch of the reconstruction: the tensor above the current layer and dL/d(it).

    `family` lists (scale, head info) of every head hypothesis this branch stands for: on a
    positively homogeneous remainder they are exact multiples, so they are solved once.
    """

    label: int
    y: np.ndarray
    g: np.ndarray
    family: tuple[tuple[float, dict[str, Any]], ...]
    layers: list[dict[str, Any]] = field(default_factory=list)


class LayerwiseInversion:
    """R-GAP / COPA layer-wise inversion of a batch-1 gradient (optionally with hybrid refinement).

    rank_rtol: singular values below rank_rtol * sigma_max count as zero (rank, deficit).
    system: "auto" solves a layer from its gradient constraints alone when they determine it
        well (R-GAP's FC treatment, extended to convs; much faster), else the stacked system;
        "stacked" always solves [K; W; P] as R-GAP / COPA do for convs.
    input_range: data range used only to break ambiguities that survive to the input (see the
        module docstring); None picks the smaller logistic root instead.
    keep_ratio: a hypothesis is dropped when its residual exceeds keep_ratio x the best one.
    hybrid, hybrid_steps, hybrid_config: COPA's gradient-matching refinement of rank-deficient
        layers (`attacks.layerwise_hybrid`).
    blas_threads: BLAS threads while solving (see `attacks.layerwise_systems.DEFAULT_BLAS_THREADS`).
    sign_iterations, sign_window, sign_kappa, sign_min_gain: correction of LeakyReLU derivative
        signs flipped by noise (`_fix_signs`; 0 iterations turns it off). Noisy gradients, such as
        the weight deltas a federated server sees (float32 rounding / lr), need it: without it
        CNN6 at lr 0.1 fell to 8-28 dB on some crops.
    relu_zero_rtol: a reconstructed ReLU output counts as zero (no weight equation, dL/dz = 0)
        when <= relu_zero_rtol x the largest output of that tensor (`attacks.layer_ops`).
    """

    def __init__(
        self,
        rank_rtol: float = RANK_RTOL,
        system: str = "auto",
        input_range: tuple[float, float] | None = (0.0, 1.0),
        keep_ratio: float = 10.0,
        hybrid: bool = False,
        hybrid_steps: int = 200,
        hybrid_config: HybridConfig | None = None,
        blas_threads: int | None = DEFAULT_BLAS_THREADS,
        sign_iterations: int = 30,
        sign_window: float = 0.2,
        sign_kappa: float = 4.0,
        sign_min_gain: float = 1e-3,
        relu_zero_rtol: float = RELU_ZERO_RTOL,
    ) -> None:
        if system not in ("auto", "stacked"):
            raise ValueError(f"system must be 'auto' or 'stacked', got {system!r}")
        self.rank_rtol = rank_rtol
        self.system = system
        self.input_range = input_range
        self.keep_ratio = keep_ratio
        self.hybrid = hybrid
        self.hybrid_config = hybrid_config or HybridConfig(steps=hybrid_steps)
        self.blas_threads = blas_threads
        self.sign_iterations = sign_iterations
        self.sign_window = sign_window
        self.sign_kappa = sign_kappa
        self.sign_min_gain = sign_min_gain
        self.relu_zero_rtol = relu_zero_rtol
        self._resolver: Resolver | None = None  # the last stacked solve, for cheap re-solves
        self.name = "layerwise-hybrid" if hybrid else "layerwise"

    # ----------------------------------------------------------------------------------------
    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        if update.batch_size != 1:
            raise AttackError(
                f"layer-wise inversion needs a batch-1 gradient, got batch size {update.batch_size}; "
                "use an optimisation attack for batches"
            )
        with blas_threads(self.blas_threads):
            return self._reconstruct(update)

    def _reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        model = update.model
        plan = plan_network(model, tuple(update.input_shape))
        if plan.untreated:
            names = "; ".join(u.message for u in plan.untreated)
            raise AttackError(f"{names}; use an optimisation attack for this model")
        grads = {name: g.detach().double().cpu().numpy() for name, g in update.gradients.items()}
        known = None
        if update.known_labels is not None:
            known = int(torch.as_tensor(update.known_labels).reshape(-1)[0])
        branches = self._head_branches(model, plan, grads, known)
        branches = _merge_scaled(branches, plan, len(plan.layers) - 1)
        for layer in reversed(plan.layers[:-1]):
            branches = self._prune([self._invert_layer(model, layer, b, grads) for b in branches])
            branches = _merge_scaled(branches, plan, layer.index)
        inputs, chosen, (scale, head), candidates = self._choose(plan, branches)
        seconds = time.perf_counter() - start
        diagnostics = {
            "layers": chosen.layers,
            "head": head,
            "label": chosen.label,
            "candidates": candidates,
            "scale_of_listed_branch": scale,
            "rank_rtol": self.rank_rtol,
            "rank_deficient_layers": [d["layer"] for d in chosen.layers if d.get("deficit", 0) > 0],
        }
        if model.head == "logistic":
            diagnostics["label_kind"] = "binary target t = label % 2 of the logistic head"
        if isinstance(plan.layers[0].module, nn.Embedding) and not plan.pre:
            # the solved unknown is the one-hot token matrix: read the tokens off it
            tokens = inputs.reshape(*plan.layers[0].bilinear.in_shape).argmax(axis=-1)
            x = torch.from_numpy(tokens.reshape(1, *update.input_shape))
        else:
            x = torch.from_numpy(inputs.reshape(1, *update.input_shape)).float()
        return Reconstruction(x, torch.tensor([chosen.label]), seconds, diagnostics)

    # ----------------------------------------------------------------------------------------
    def _head_branches(
        self, model: ZooModel, plan: NetworkPlan, grads: dict[str, np.ndarray], known: int | None
    ) -> list[_Hypothesis]:
        start = time.perf_counter()
        head = plan.head
        if head.geometry is None:
            raise AttackError(f"layer {head.module_index} (Linear head) must take a feature vector")
        weight = weight_of(head)
        grad_w = grads[head.weight_name]
        grad_b = grads[head.bias_name] if head.bias_name else None
        if model.head not in ("ce", "logistic"):
            raise AttackError(
                f"layer-wise inversion solves cross-entropy or logistic heads; {model.name} declares "
                f"head {model.head!r}; use an optimisation attack"
            )
        if model.head == "logistic":
            if head.geometry.out_channels != 1:
                raise AttackError("a logistic head must have exactly one output logit")
            hyps = logistic_head(grad_w, grad_b, weight, known, _positive_head_input(plan))
        else:
            bias = head.module.bias.detach().double().numpy() if head.bias_name else None
            hyps = [cross_entropy_head(grad_w, grad_b, weight, bias, known)]
        return [self._branch_from_head(head, weight, grad_w, h, time.perf_counter() - start) for h in hyps]

    @staticmethod
    def _branch_from_head(
        head: PlannedLayer, weight: np.ndarray, grad_w: np.ndarray, hyp: HeadHypothesis, seconds: float
    ) -> _Hypothesis:
        resid = np.linalg.norm(grad_w - np.outer(hyp.k, hyp.x)) / max(np.linalg.norm(grad_w), 1e-300)
        k_norm = float(np.linalg.norm(hyp.k))
        diag = _layer_diag(
            head,
            "analytic",
            head.geometry.unknowns,
            head.geometry.unknowns,
            float(resid),
            k_norm,
            k_norm,
            seconds,
        )
        y, g = hyp.x.reshape(head.in_shape), weight.T @ hyp.k
        return _Hypothesis(hyp.label, y, g, ((1.0, hyp.info),), layers=[diag])

    # ----------------------------------------------------------------------------------------
    def _invert_layer(
        self,
        model: nn.Module,
        layer: PlannedLayer,
        branch: _Hypothesis,
        grads: dict[str, np.ndarray],
    ) -> _Hypothesis:
        start = time.perf_counter()
        pulled = pull_back(layer.post, branch.y, branch.g, zero_rtol=self.relu_zero_rtol)
        k, cons = pulled.k.reshape(layer.out_shape), pulled.constraints
        weight = weight_of(layer)
        geom = layer.geometry
        grad_w = grads[layer.weight_name]
        extra: dict[str, Any] = {}
        if pulled.treatment:
            extra["treatment"] = pulled.treatment
        pre = cons.values.reshape(layer.out_shape)
        k_observed = False
        if layer.bias_name is not None:
            grad_b = grads[layer.bias_name]
            bias = layer.module.bias.detach().double().numpy()
            k_observed = geom is not None and geom.is_linear
            k, extra["bias_check"] = _use_bias_gradient(k_observed, k, grad_b, layer.channels_first)
            cons = cons.minus(bias_vector(bias, layer.out_shape, layer.channels_first))
        structured = geom is not None and cons.selection_only
        full = structured and bool(cons.rows.all())
        if structured:
            z = cons.values.reshape(layer.out_shape)
            rows = None if full else cons.rows.reshape(layer.out_shape)
            x, info = self._solve(geom, weight, k, grad_w, z, weight_rows=rows)
            act = pulled.activation
            if full and isinstance(act, nn.LeakyReLU) and not k_observed and self.sign_iterations > 0:
                c = np.reshape(pulled.activation_grad, k.shape)
                x, k, info, extra["sign_flips"] = self._fix_signs(
                    geom, weight, grad_w, pre, c, k, z, x, info, float(act.negative_slope)
                )
            alpha = balance(geom, weight, k, rows)
        else:
            x, info, alpha = constrained_solve(layer.bilinear, geom, k, cons, grad_w, self.rank_rtol)
        if full:
            res = residuals(geom, alpha, weight, k, grad_w, z, x)
        else:
            res = constrained_residuals(layer.bilinear, k, cons, grad_w, x, alpha)
        if self.hybrid and info.deficit > 0:
            if full:
                x, extra["hybrid"] = refine_layer(
                    model, layer, x, k, z, alpha, grads, branch.label, self.hybrid_config
                )
                extra["residual_before_hybrid"] = res.stacked
                res = residuals(geom, alpha, weight, k, grad_w, z, x)
            else:
                extra["hybrid"] = "skipped: refinement needs every weight constraint of the layer"
        padded = layer.padding_unknowns
        diag = _layer_diag(
            layer,
            info.method,
            layer.unknowns,
            info.rank + padded,
            res.stacked,
            info.sigma_min,
            info.sigma_max,
            time.perf_counter() - start,
        )
        diag.update(gradient_residual=res.gradient, weight_residual=res.weight, **extra)
        if geom is not None:
            below = backprop_input(geom, weight, k)
        else:
            below = layer.bilinear.adjoint(np.ravel(k)[None])[0]
        return _Hypothesis(
            branch.label,
            x.reshape(layer.bilinear.in_shape),
            below.reshape(layer.bilinear.in_shape),
            branch.family,
            [*branch.layers, diag],
        )

    def _fix_signs(
        self,
        geom: ConvGeometry,
        weight: np.ndarray,
        grad_w: np.ndarray,
        pre: np.ndarray,
        c: np.ndarray,
        k: np.ndarray,
        z: np.ndarray,
        x: np.ndarray,
        info: RankInfo,
        slope: float,
    ) -> tuple[np.ndarray, np.ndarray, RankInfo, int]:
        """Correct LeakyReLU derivative signs that noise in the reconstruction above flipped.

        k = c * sigma'(pre) depends on the sign of the reconstructed pre-activation. Where the
        true value is near zero, noise in the layer above (e.g. float32 rounding of a weight
        delta) can flip that sign; k then errs by (1 - slope) * c at that entry, which the
        solve below amplifies (one flip took CNN6 from 70 dB to 8-28 dB). A wrong entry
        (o, p) leaves the residual d * patch_p(x) in dL/dW[o]; so, while some entry with a
        small |pre| (<= sign_window * rms) explains a significant (> sign_kappa robust sigmas)
        and useful (> sign_min_gain of the squared residual) part of the gradient residual,
        flip it - the smallest |pre| first, one per pass for gradient-only layers (their
        solution spreads an error over the whole channel) and spatially separated ones for
        stacked layers - re-solve, and keep the flips only if the solve's objective drops.
        """
        shape, wshape = k.shape, tuple(weight.shape)
        pre_f, c_f = pre.ravel(), c.ravel()
        z_f = np.asarray(z, dtype=np.float64).ravel()
        state = pre_f > 0
        rms = float(np.sqrt(np.mean(pre_f**2))) or 1.0
        cand = np.abs(pre_f) <= self.sign_window * rms
        g_f = np.ravel(grad_w)
        total = 0

        def resid(kk: np.ndarray, xx: np.ndarray) -> np.ndarray:
            return g_f - apply_gradient(geom, wshape, kk.reshape(shape), xx).ravel()

        resolver = self._resolver if info.method == "cholesky" else None
        alpha2 = resolver.system.alpha**2 if resolver is not None else 0.0

        def objective(rr: np.ndarray, xx: np.ndarray) -> float:
            # what the solve minimises: the stacked residual for stacked layers
            total = float(rr @ rr)
            if alpha2:
                rw = apply_weight(geom, weight, xx) - z_f
                total = alpha2 * total + float(rw @ rw)
            return total

        r = resid(k, x)
        r2 = float(r @ r)
        obj = objective(r, x)
        out_hw = (geom.out_height, geom.out_width)
        radius = (2 * -(-geom.kernel[0] // geom.stride[0]), 2 * -(-geom.kernel[1] // geom.stride[1]))
        for _ in range(self.sign_iterations):
            sigma = 1.4826 * float(np.median(np.abs(r)))
            num, den = output_gradient_fit(geom, r, x)
            d = c_f * np.where(state, slope - 1.0, 1.0 - slope)
            gain = d * (2 * num - d * den)
            signif = d * num > self.sign_kappa * sigma * np.abs(d) * np.sqrt(den)
            useful = gain > self.sign_min_gain * r2
            chosen = _separated(np.flatnonzero(cand & signif & useful), np.abs(pre_f), out_hw, radius)
            if resolver is None:  # gradient-only: the solved input absorbs errors globally
                chosen = chosen[:1]
            if chosen.size == 0:
                break
            new_state = state.copy()
            new_state[chosen] = ~new_state[chosen]
            new_k = (c_f * np.where(new_state, 1.0, slope)).reshape(shape)
            if resolver is not None:
                new_x, new_info = resolver.solve(new_k, grad_w, z_f, x), info
            else:
                new_x, new_info = self._solve(geom, weight, new_k, grad_w, z)
            new_r = resid(new_k, new_x)
            new_obj = objective(new_r, new_x)
            if new_obj >= obj:
                break
            total += int(chosen.size)
            state, k, x, info, r, obj = new_state, new_k, new_x, new_info, new_r, new_obj
            r2 = float(r @ r)
        return x, k, info, total

    def _solve(
        self,
        geom: ConvGeometry,
        weight: np.ndarray,
        k: np.ndarray,
        grad_w: np.ndarray,
        z: np.ndarray,
        weight_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, RankInfo]:
        """Gradient constraints alone when they determine the layer well ("auto"), else [K; W; P]
        (`weight_rows`: the weight constraints that are known, e.g. where a ReLU output is > 0)."""
        self._resolver = None
        solved = solve_gradient_only(geom, k, grad_w) if self.system == "auto" else None
        if solved is not None:
            return solved
        system = build_system(geom, weight, k, grad_w, z, weight_rows=weight_rows)
        keep: dict[str, Any] = {}
        x, info = solve_normal(system, self.rank_rtol, keep)
        assert x is not None
        self._resolver = Resolver(system, keep["factor"], weight, k) if "factor" in keep else None
        return x, info

    def _prune(self, branches: list[_Hypothesis]) -> list[_Hypothesis]:
        """Drop hypotheses the layer just solved finds inconsistent (residual >> the best one)."""
        if len(branches) <= 1:
            return branches
        best = min(b.layers[-1]["residual"] for b in branches)
        return [b for b in branches if b.layers[-1]["residual"] <= self.keep_ratio * best + 1e-12]

    # ----------------------------------------------------------------------------------------
    def _choose(
        self, plan: NetworkPlan, branches: list[_Hypothesis]
    ) -> tuple[np.ndarray, _Hypothesis, tuple[float, dict[str, Any]], list[dict[str, Any]]]:
        """Undo the ops before the first layer, then pick among surviving candidates (module doc)."""
        candidates = []
        for branch in branches:
            base = _input_from(plan, branch)
            candidates += [(scale * base, branch, (scale, head)) for scale, head in branch.family]
        summary = [
            {"label": b.label, "scale": s, "mu": h.get("mu"), "range_violation": self._violation(x)}
            for x, b, (s, h) in candidates
        ]

        def key(item: tuple[np.ndarray, _Hypothesis, tuple[float, dict[str, Any]]]) -> tuple[float, float]:
            x, _, (_, head) = item
            if self.input_range is None:
                return (0.0, abs(head.get("mu", 0.0)))
            return (round(self._violation(x), 12), -float(np.ptp(x)))

        x, branch, member = min(candidates, key=key)
        return x, branch, member, summary

    def _violation(self, x: np.ndarray) -> float:
        if self.input_range is None:
            return 0.0
        lo, hi = self.input_range
        return float(np.mean(np.clip(lo - x, 0, None) ** 2 + np.clip(x - hi, 0, None) ** 2))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _input_from(plan: NetworkPlan, branch: _Hypothesis) -> np.ndarray:
    """Undo the ops before the first layer (they must determine their input entry by entry)."""
    if not plan.pre:
        return branch.y
    pulled = pull_back(plan.pre, branch.y, branch.g)
    cons = pulled.constraints
    if not cons.is_full:
        index, op, _ = plan.pre[0]
        raise AttackError(
            f"layer {index} ({type(op).__name__}) before the first layer hides part of the input"
        )
    return cons.values.reshape(plan.input_shape)


def _separated(
    entries: np.ndarray, magnitude: np.ndarray, out_hw: tuple[int, int], radius: tuple[int, int]
) -> np.ndarray:
    """Entries (flat over channel, row, col) in order of increasing `magnitude`, skipping any
    within `radius` (rows, cols, any channel) of one already taken: a wrong derivative sign
    also makes its neighbours look wrong, because the solved input absorbed part of the error."""
    taken: list[int] = []
    pixels = out_hw[0] * out_hw[1]
    rows_taken: list[tuple[int, int]] = []
    for e in entries[np.argsort(magnitude[entries], kind="stable")]:
        p = int(e) % pixels
        row, col = divmod(p, out_hw[1])
        if any(abs(row - a) < radius[0] and abs(col - b) < radius[1] for a, b in rows_taken):
            continue
        taken.append(int(e))
        rows_taken.append((row, col))
    return np.asarray(taken, dtype=np.int64)


def _use_bias_gradient(
    is_linear: bool, k: np.ndarray, grad_b: np.ndarray, channels_first: bool = True
) -> tuple[np.ndarray, float]:
    """A Linear bias gradient (on a vector) is k itself (observed, so used); otherwise it is k summed
    over positions (conv: all axes but the channel axis 0; Linear on a sequence: all but the last)."""
    scale = max(float(np.linalg.norm(grad_b)), 1e-300)
    if is_linear:
        check = float(np.linalg.norm(k.ravel() - grad_b) / scale)
        return np.asarray(grad_b, dtype=np.float64).reshape(k.shape), check
    summed = k.reshape(k.shape[0], -1).sum(1) if channels_first else k.reshape(-1, k.shape[-1]).sum(0)
    return k, float(np.linalg.norm(summed - np.ravel(grad_b)) / scale)


# Ops that keep the sign of their input's entries (so a positive range survives them).
_SIGN_KEEPING = (nn.Flatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.Dropout)
# Ops that commute with multiplying their input by a positive scalar.
_SCALABLE = (*_SIGN_KEEPING, nn.LeakyReLU, nn.ReLU)


def _positive_head_input(plan: NetworkPlan) -> bool:
    """True when the op feeding the head has a positive range (sigmoid; ReLU: non-negative, and
    >0 somewhere), so sign(dL/dW) = sign(k)."""
    ops = plan.layers[-2].post if len(plan.layers) > 1 else plan.pre
    acts = [op for _, op, _ in ops if not isinstance(op, _SIGN_KEEPING)]
    return bool(acts) and isinstance(acts[-1], (nn.Sigmoid, nn.ReLU))


def _positively_homogeneous_below(plan: NetworkPlan, index: int) -> bool:
    """Layers 0..index and the ops between them commute with positive scaling (no bias, leaky/id)."""
    ops = list(plan.pre)
    for layer in plan.layers[:index]:
        ops += list(layer.post)
    scalable = all(isinstance(op, _SCALABLE) for _, op, _ in ops)
    return scalable and all(layer.bias_name is None for layer in plan.layers[:index])


def _merge_scaled(branches: list[_Hypothesis], plan: NetworkPlan, index: int) -> list[_Hypothesis]:
    """Fold branches that are positive multiples of another into its `family` when the layers below
    are positively homogeneous: their solutions are then exact multiples, so solve once."""
    if len(branches) <= 1 or not _positively_homogeneous_below(plan, index):
        return branches
    merged: list[_Hypothesis] = []
    for branch in branches:
        for kept in merged:
            ratio = _family_ratio(branch, kept)
            if ratio is not None:
                kept.family += tuple((s * ratio, head) for s, head in branch.family)
                break
        else:
            merged.append(branch)
    return merged


def _family_ratio(branch: _Hypothesis, kept: _Hypothesis) -> float | None:
    """s with branch = s * kept in the data and kept = s * branch in dL/d(data), same label."""
    ratio = _positive_ratio(branch.y, kept.y)
    inverse = _positive_ratio(kept.g, branch.g)
    if branch.label != kept.label or ratio is None or inverse is None:
        return None
    return ratio if abs(inverse / ratio - 1.0) < 1e-9 else None


def _positive_ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """s > 0 with a = s * b (to 1e-9 relative), else None."""
    nb = float(b.ravel() @ b.ravel())
    if nb == 0:
        return None
    s = float(a.ravel() @ b.ravel()) / nb
    if s <= 0:
        return None
    err = np.linalg.norm(a - s * b) / max(np.linalg.norm(a), 1e-300)
    return s if err < 1e-9 else None


def _layer_diag(
    layer: PlannedLayer,
    method: str,
    unknowns: int,
    rank: int,
    residual: float,
    sigma_min: float,
    sigma_max: float,
    seconds: float,
) -> dict[str, Any]:
    return {
        "layer": layer.index,
        "module": layer.module_index,
        "type": layer.kind,
        "method": method,
        "unknowns": unknowns,
        "rank": rank,
        "deficit": unknowns - rank,
        "residual": residual,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "seconds": seconds,
    }
