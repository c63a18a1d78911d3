"""Layer-wise gradient inversion (R-GAP, Zhu & Blaschko 2021; COPA, Chen & Campbell 2021).

For one sample (batch size 1) the attack walks the network from the output to the input. The
head gives the label, k = dL/dlogits and the head's input (`attacks.layerwise.head`). Then, for
each layer from the top down (`attacks.layerwise.network_plan`: Linear, Conv1d/2d/3d, an Embedding at the
input), it

1. pulls the reconstruction above back through the ops in between (`attacks.layerwise.layer_ops`):
   activations are inverted, z = sigma^{-1}(x_next), and k = (W_next^T k_next) * sigma'(z); a
   ReLU keeps the weight constraints of its positive outputs only and zeroes k elsewhere;
   BatchNorm (eval) is inverted; average pooling gives linear constraints T z = r. A Linear
   layer with bias uses its observed bias gradient, which *is* k; a conv bias gradient, sum of k
   over positions, is reported as a check. What the server cannot know - max-pool winners, a
   ReLU pattern under pooling, train-mode batch statistics - and modules without a pull-back
   (residual blocks, ...) make the attack decline with an AttackError naming the layer;
2. solves the stacked system [K; W; P] x = [vec(dL/dW); z - b; 0] (only the known rows of W, or
   T W, when the ops hide some) in the least-squares sense: plain Conv2d / Linear layers use the
   structured normal equations of `attacks.layerwise.systems` (float64, padding eliminated),
   every other case the autograd-built systems of `attacks.layerwise.generic_systems`.
   With `system="auto"` (default) a layer whose gradient constraints alone determine x with
   good conditioning is solved from them alone - one small system shared by all input channels,
   as R-GAP does for FC layers - and the weight constraints are reported as a residual check.
   On CNN6 that is the four deeper convs; the first two need the stacked system.
4. corrects LeakyReLU derivative signs that noise flipped (near-zero pre-activations): entries
   whose flip lowers the re-solved objective significantly are flipped and the layer re-solved
   (`LayerwiseInversion._fix_signs`).
   ReLU zeros are read with a noise-aware threshold instead (`attacks.layerwise.layer_ops`).

When the update carries its noise (`ObservedUpdate.gradient_noise`: float32 rounding of weight
deltas / lr) and the head's residual confirms it, each layer is solved by generalised least
squares: gradient equations weighted by 1 / sigma^2, weight constraints by the inverse of the
predicted error of z, which is the previous solve's error covariance pulled back through the
inverse activation (`attacks.layerwise.noise`). The same prediction says which derivative signs
are in doubt and how likely each is, and whether a gradient-only solution agrees with the weight
constraints as well as the noise allows; when it does not, the layer is solved stacked.

Every layer's rank, deficit, residual and extreme singular values are reported: a rank-deficient
layer (e.g. CNN6-d's second conv) means the data is not determined by the gradient, and the
reconstruction below it is a minimum-norm guess. `hybrid=True` refines such layers by gradient
matching (COPA's hybrid, `attacks.layerwise.hybrid`).

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
from attacks.layerwise.generic_systems import bias_vector, constrained_residuals, constrained_solve
from attacks.layerwise.head import HeadHypothesis, cross_entropy_head, logistic_head
from attacks.layerwise.hybrid import HybridConfig, refine_layer
from attacks.layerwise.layer_ops import CLIPPED_ACTIVATIONS, RELU_ZERO_RTOL, op_kind, pull_back
from attacks.layerwise.network_plan import NetworkPlan, PlannedLayer, plan_network, weight_of
from attacks.layerwise.noise import (
    LayerSolve,
    choose_flips,
    degrees_of_freedom,
    flip_impact,
    flip_statistics,
    gradient_residual,
    head_input_variance,
    head_noise_ratio,
    objective,
    pull_back_variance,
    robust_scale,
    sign_candidates,
    sign_log_odds,
    solve_variance,
    weight_consistency,
)
from attacks.layerwise.systems import (
    DEFAULT_BLAS_THREADS,
    RANK_RTOL,
    ConvGeometry,
    Resolver,
    backprop_input,
    balance,
    blas_threads,
    build_system,
    residuals,
    solve_gradient_only,
    solve_normal,
)
from models.base import ZooModel

# Sign repair with a noise model: while a layer's objective exceeds this multiple of its expected
# value (clean CNN6 layers measure 0.87-1.11), the search for wrong signs widens by another
# `sign_candidates` entries, at most MAX_WIDENINGS times (each costs that many more columns of
# the inverse normal matrix per round).
WIDEN_RATIO = 1.5
MAX_WIDENINGS = 3

STACKED_FALLBACK = "stacked: the gradient-only solution contradicts the weight constraints"


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
    y_variance: np.ndarray | None = None  # predicted error variance of y (with a noise model)


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
        layers (`attacks.layerwise.hybrid`).
    blas_threads: BLAS threads while solving (see `attacks.layerwise.systems.DEFAULT_BLAS_THREADS`).
    sign_iterations, sign_window, sign_band, sign_kappa, sign_candidates: correction of LeakyReLU
        derivative signs flipped by noise (`_fix_signs`; 0 iterations turns it off). Noisy
        gradients, such as the weight deltas a federated server sees (float32 rounding / lr),
        need it: without it CNN6 at lr 0.1 fell to 8-28 dB on some crops. An entry is in doubt
        when |z| <= sign_band predicted stds (with a noise model) or <= sign_window * rms(z)
        (without); at most sign_candidates of them are tested per layer, and a flip must be
        sign_kappa standard errors significant.
    relu_zero_rtol: a reconstructed ReLU output counts as zero (no weight equation, dL/dz = 0)
        when <= relu_zero_rtol x the largest output of that tensor (`attacks.layerwise.layer_ops`).
    consistency_ratio: with a noise model, a gradient-only solution whose weighted
        weight-constraint residual exceeds this many times what the noise explains is replaced
        by the stacked solve (`attacks.layerwise.noise.weight_consistency`).
    noise_model_ratio: the update's `gradient_noise` is used only when the head's weighted
        residual is at most this many times its expected value (`head_noise_ratio`): a defence's
        noise, clipping or several local steps are not in that model, and trusting it then
        would make the weights and sign tests overconfident.

    When the update carries `gradient_noise` (weight deltas), every layer is solved by
    generalised least squares and the predicted error is propagated down the layers
    (`attacks.layerwise.noise`); exact gradients are solved as before.
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
        sign_band: float = 6.0,
        sign_kappa: float = 4.0,
        sign_candidates: int = 64,
        consistency_ratio: float = 4.0,
        noise_model_ratio: float = 4.0,
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
        self.sign_band = sign_band
        self.sign_kappa = sign_kappa
        self.sign_candidates = sign_candidates
        self.consistency_ratio = consistency_ratio
        self.noise_model_ratio = noise_model_ratio
        self.relu_zero_rtol = relu_zero_rtol
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
        noise = None
        if update.gradient_noise is not None:
            noise = {name: s.detach().double().cpu().numpy() for name, s in update.gradient_noise.items()}
        known = None
        if update.known_labels is not None:
            known = int(torch.as_tensor(update.known_labels).reshape(-1)[0])
        branches = self._head_branches(model, plan, grads, known, noise)
        noise_model = self._check_noise_model(noise, branches)
        if noise is not None and not noise_model["used"]:
            noise = None
            for branch in branches:
                branch.y_variance = None
        branches = _merge_scaled(branches, plan, len(plan.layers) - 1)
        for layer in reversed(plan.layers[:-1]):
            branches = self._prune([self._invert_layer(model, layer, b, grads, noise) for b in branches])
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
            "noise_model": noise_model,
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
        self,
        model: ZooModel,
        plan: NetworkPlan,
        grads: dict[str, np.ndarray],
        known: int | None,
        noise: dict[str, np.ndarray] | None = None,
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
        seconds = time.perf_counter() - start
        branches = [self._branch_from_head(head, weight, grad_w, h, seconds) for h in hyps]
        if noise is not None:
            sigma = noise[head.weight_name]
            bias_sigma = noise[head.bias_name] if head.bias_name else None
            for branch, hyp in zip(branches, hyps, strict=True):
                variance = head_input_variance(hyp.k, sigma, hyp.x, bias_sigma)
                branch.y_variance = variance.reshape(head.in_shape)
                branch.layers[0]["noise_ratio"] = head_noise_ratio(grad_w, hyp.k, hyp.x, sigma)
        return branches

    def _check_noise_model(
        self, noise: dict[str, np.ndarray] | None, branches: list[_Hypothesis]
    ) -> dict[str, Any]:
        """Use the update's `gradient_noise` only if the head's residual is what it explains
        (`head_noise_ratio` <= noise_model_ratio for some head hypothesis): noise the model
        does not know of would make its weights and sign tests overconfident."""
        if noise is None:
            return {"used": False, "reason": "the update carries no gradient noise (exact gradient)"}
        ratio = min(b.layers[0]["noise_ratio"] for b in branches)
        used = ratio <= self.noise_model_ratio
        reason = (
            "head residual explained by gradient_noise"
            if used
            else (
                "head residual exceeds what gradient_noise explains (noise the model does not know of); "
                "solved without a noise model"
            )
        )
        return {"used": used, "head_ratio": ratio, "reason": reason}

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
        noise: dict[str, np.ndarray] | None = None,
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
        variance = None
        if structured:
            z = cons.values.reshape(layer.out_shape)
            rows = None if full else cons.rows.reshape(layer.out_shape)
            # The noise model propagates errors through invertible activations only (module doc).
            noisy = full and noise is not None and _invertible_ops(layer.post)
            sigma = noise[layer.weight_name] if noisy else None
            z_var = None
            if sigma is not None and branch.y_variance is not None:
                z_var = pull_back_variance(layer.post, branch.y, branch.y_variance).ravel()
            act = pulled.activation
            c = np.reshape(pulled.activation_grad, k.shape) if act is not None else None
            repair = full and isinstance(act, nn.LeakyReLU) and not k_observed and self.sign_iterations > 0
            slope = float(act.negative_slope) if repair else 0.0
            if k_observed:
                # dL/dW = k x^T with k observed (the bias gradient): the head's rank-1 problem,
                # solved as the head is; k's own noise makes per-entry weights the wrong model here
                solve = self._solve(geom, weight, k, grad_w, z, weight_rows=rows)
                if sigma is not None and z_var is not None:
                    bias_sigma = noise[layer.bias_name] if noise is not None and layer.bias_name else None
                    solve.variance = head_input_variance(k, sigma, solve.x, bias_sigma)
            else:
                solve = self._solve(geom, weight, k, grad_w, z, sigma, z_var, weight_rows=rows)
            if repair:
                solve, k, extra["sign_flips"] = self._fix_signs(
                    geom, weight, grad_w, pre, c, k, z, solve, slope, z_var, sigma
                )
            if solve.info.method == "gradient-only" and z_var is not None and not k_observed:
                ratio = weight_consistency(geom, weight, solve, z, z_var)
                extra["weight_consistency"] = ratio
                if ratio > self.consistency_ratio:
                    solve = self._solve(geom, weight, k, grad_w, z, sigma, z_var, stacked=True)
                    if repair:
                        solve, k, flips = self._fix_signs(
                            geom, weight, grad_w, pre, c, k, z, solve, slope, z_var, sigma
                        )
                        extra["sign_flips"] = extra.get("sign_flips", 0) + flips
                    extra["fallback"] = STACKED_FALLBACK
            x, info = solve.x, solve.info
            if sigma is not None and z_var is not None and not k_observed:
                dof = degrees_of_freedom(geom, weight, solve)
                extra["noise_ratio"] = objective(geom, weight, solve, k, grad_w, z, x) / dof
            if solve.variance is not None:
                extra["predicted_rmse"] = float(np.sqrt(np.mean(solve.variance)))
                variance = solve.variance.reshape(layer.in_shape)
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
            variance,
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
        solve: LayerSolve,
        slope: float,
        z_var: np.ndarray | None = None,
        sigma: np.ndarray | None = None,
    ) -> tuple[LayerSolve, np.ndarray, int]:
        """Correct LeakyReLU derivative signs that noise in the reconstruction above flipped.

        k = c * sigma'(pre) depends on the sign of the reconstructed pre-activation. Where the
        true value is near zero, noise in the layer above (e.g. float32 rounding of a weight
        delta) can flip that sign; k then errs by (1 - slope) * c at that entry, which the
        solve below amplifies (one flip took CNN6 from 70 dB to 8-28 dB). The entries in doubt
        (`sign_candidates`: within sign_band predicted stds of zero, the most damaging first,
        or a window without a noise model) are tested together on the linearised model with x
        re-solved (`attacks.layerwise.noise.flip_statistics`: the solve has already bent x
        towards the wrong k, so a flip's gain must be measured after x moves back) and chosen
        by local search against the prior odds of each sign (`choose_flips`); the layer is
        re-solved and the flips kept only if the solve's objective drops. Repeats until nothing
        significant is left; with a noise model, while the objective stays above
        WIDEN_RATIO x its expected value the search widens to the next sign_candidates entries.
        """
        shape, wshape = k.shape, tuple(weight.shape)
        pre_f, c_f = pre.ravel(), c.ravel()
        state = pre_f > 0
        weighted = z_var is not None and sigma is not None  # the weights are inverse variances
        impact = flip_impact(geom, solve.x, solve, c_f * (1.0 - slope))
        limit = self.sign_candidates * (MAX_WIDENINGS + 1 if weighted else 1)
        ranked = sign_candidates(pre_f, z_var, self.sign_window, self.sign_band, limit, impact)
        if ranked.size == 0 or solve.inverse is None:
            return solve, k, 0
        size = self.sign_candidates
        best = objective(geom, weight, solve, k, grad_w, z, solve.x)
        total = 0
        for _ in range(self.sign_iterations):
            cand = ranked[:size]
            r = gradient_residual(geom, wshape, k, grad_w, solve.x)
            stats = flip_statistics(geom, k, solve.x, r, solve, cand)
            delta = c_f[cand] * np.where(state[cand], slope - 1.0, 1.0 - slope)
            cost = None if z_var is None else sign_log_odds(pre_f[cand], z_var[cand], state[cand])
            # with inverse-variance weights the noise scale is known (1); the residual would
            # understate it, since the solve absorbs part of the noise
            scale = 1.0 if weighted else robust_scale(geom, r, solve)
            pick = choose_flips(stats, delta, scale, self.sign_kappa, cand.size, cost)
            accepted = False
            if pick.size:
                new_state = state.copy()
                new_state[cand[pick]] = ~new_state[cand[pick]]
                new_k = (c_f * np.where(new_state, 1.0, slope)).reshape(shape)
                new_solve = self._resolve(geom, weight, new_k, grad_w, z, sigma, z_var, solve)
                value = objective(geom, weight, new_solve, new_k, grad_w, z, new_solve.x)
                accepted = value < best
            if accepted:
                total += int(pick.size)
                state, k, solve, best = new_state, new_k, new_solve, value
                continue
            unexplained = weighted and best > WIDEN_RATIO * degrees_of_freedom(geom, weight, solve)
            if not unexplained or size >= ranked.size:
                break
            size += self.sign_candidates
        return solve, k, total

    def _resolve(
        self,
        geom: ConvGeometry,
        weight: np.ndarray,
        k: np.ndarray,
        grad_w: np.ndarray,
        z: np.ndarray,
        sigma: np.ndarray | None,
        z_var: np.ndarray | None,
        solve: LayerSolve,
    ) -> LayerSolve:
        """`solve` again for a k that changed in a few entries: a stacked Cholesky solve is
        patched and refactorised (`Resolver.refresh`), anything else solved afresh."""
        refreshed = None if solve.resolver is None else solve.resolver.refresh(k, grad_w, z)
        if refreshed is None:
            stacked = solve.row_weights is not None
            return self._solve(geom, weight, k, grad_w, z, sigma, z_var, stacked=stacked)
        x, resolver = refreshed
        inverse = resolver.inverse()
        variance = solve_variance(inverse, geom) if solve.variance is not None else None
        return LayerSolve(
            x, solve.info, solve.gradient_weights, solve.row_weights, inverse, variance, resolver
        )

    def _solve(
        self,
        geom: ConvGeometry,
        weight: np.ndarray,
        k: np.ndarray,
        grad_w: np.ndarray,
        z: np.ndarray,
        sigma: np.ndarray | None = None,
        z_var: np.ndarray | None = None,
        stacked: bool = False,
        weight_rows: np.ndarray | None = None,
    ) -> LayerSolve:
        """Gradient constraints alone when they determine the layer well ("auto" and not
        `stacked`), else [K; W; P]; generalised least squares when the noise is known (`sigma`
        for dL/dW, `z_var` for the weight constraints); `weight_rows`: the weight constraints
        that are known, e.g. where a ReLU output is > 0."""
        keep: dict[str, Any] = {}
        if self.system == "auto" and not stacked:
            solved = solve_gradient_only(geom, k, grad_w, gradient_sigma=sigma, keep=keep)
            if solved is not None:
                x, info = solved
                wg = 1.0 if keep["gradient_weights"] is None else keep["gradient_weights"]
                return LayerSolve(x, info, wg, None, keep["inverse"], keep.get("variance"))
        tau = None if z_var is None else np.sqrt(z_var)
        system = build_system(
            geom, weight, k, grad_w, z, weight_rows=weight_rows, gradient_sigma=sigma, weight_sigma=tau
        )
        x, info = solve_normal(system, self.rank_rtol, keep)
        assert x is not None
        weighted = system.gradient_weights is not None
        solve = LayerSolve(
            x,
            info,
            system.gradient_weights if weighted else system.alpha**2,
            system.row_weights if weighted else 1.0,
            keep.get("inverse"),
        )
        if sigma is not None and tau is not None and solve.inverse is not None:
            solve.variance = solve_variance(solve.inverse, geom)
        if "factor" in keep:
            solve.resolver = Resolver(system, keep["factor"], weight, k)
        return solve

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


def _invertible_ops(ops: tuple[tuple[int, nn.Module, tuple[int, ...]], ...]) -> bool:
    """True when only reshapes and invertible activations separate a layer from the one above:
    the noise model's error pull-back (`attacks.layerwise.noise.pull_back_variance`) covers these."""
    return all(
        op_kind(op) == "reshape" or (op_kind(op) == "elementwise" and isinstance(op, CLIPPED_ACTIVATIONS))
        for _, op, _ in ops
    )


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
