"""Closed-form leakage: iDLG's label rule and the analytic inversion of a first Linear layer.

Both need no optimisation, so an auditor can run them on every update. For a Linear layer with
bias, dL/dW_j = dL/db_j · x for each output row j (one sample), so the input is a ratio of two
observed gradients (Phong et al. 2017; Geiping et al. 2020). The label rule follows from the
cross-entropy gradient dL/dz = softmax(z) − onehot(y), whose only negative entry is the label
(Zhao et al. 2020, iDLG).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from attacks.base import AttackError, ObservedUpdate, Reconstruction, parameter_layers

# Rows whose |dL/db_j| is below this fraction of the largest one carry only rounding noise.
RELATIVE_BIAS_TOLERANCE = 1e-6
# Modules that may precede the first Linear without changing what it sees (up to a reshape).
_TRANSPARENT = (nn.Flatten, nn.Identity)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=True))


def _last_linear(update: ObservedUpdate) -> tuple[str, nn.Linear]:
    """The output layer: the last Linear of the flat `layers`, or, for a model without them
    (e.g. ProtoPNet), the last Linear it registers (its output layer by convention)."""
    model = update.model
    modules = parameter_layers(model) if model.layers is not None else list(model.named_modules())
    linears = [(name, m) for name, m in modules if isinstance(m, nn.Linear)]
    if not linears:
        raise AttackError("the iDLG label rule needs a final nn.Linear layer; the model has none")
    name, layer = linears[-1]
    if layer.out_features < 2:
        raise AttackError(
            "the iDLG label rule needs a softmax/cross-entropy head with one row per class; "
            f"{name} has {layer.out_features} output (single-logit heads leak only the label's sign)"
        )
    return name, layer


def _label_scores(update: ObservedUpdate) -> torch.Tensor:
    """Per-class score whose negative entries mark labels present in the batch.

    With a bias this is dL/db = mean_i(p_i − onehot(y_i)). Without one it is the row sum of dL/dW,
    whose sign equals that of dL/db only when the layer's inputs are non-negative (after sigmoid
    or ReLU), which is the assumption breaching's row-sum strategy also makes.
    """
    name, layer = _last_linear(update)
    if layer.bias is not None:
        return update.gradients[f"{name}.bias"].detach().double().clone()
    return update.gradients[f"{name}.weight"].detach().double().sum(dim=1)


def recover_labels_idlg(update: ObservedUpdate) -> torch.Tensor:
    """Labels of the batch from the last layer's gradient (iDLG), sorted ascending, int64.

    Batch 1: exact for cross-entropy heads with a bias (the single negative bias-gradient row).
    Batch > 1: a best guess. Each occurrence of class j lowers dL/db_j by 1/B while softmax mass
    raises it, so the classes are picked greedily, the most negative row first, adding 1/B back
    after each pick. This is exact when every class's mean probability is below 1/B per
    occurrence, and fails when the model is confident (p_j close to 1 hides the label) or
    when the update is a multi-step FedAvg delta rather than one gradient. The order of the
    returned labels says nothing about which sample carries which label.
    """
    scores = _label_scores(update)
    batch = int(update.batch_size)
    if batch < 1:
        raise AttackError(f"batch_size must be >= 1, got {batch}")
    if batch == 1:
        return scores.argmin().reshape(1)
    picks = []
    for _ in range(batch):
        j = int(scores.argmin())
        picks.append(j)
        scores[j] += 1.0 / batch
    return torch.tensor(sorted(picks), dtype=torch.int64)


def _first_linear(update: ObservedUpdate) -> tuple[str, nn.Linear]:
    """The first parametric layer, which must be a Linear with bias behind only Flatten/Identity."""
    for name, module in parameter_layers(update.model):
        if isinstance(module, nn.Linear):
            if module.bias is None:
                raise AttackError(f"{name} is a Linear without bias; analytic FC inversion needs dL/db")
            return name, module
        if _has_parameters(module):
            raise AttackError(
                f"the first parametric layer {name} is {type(module).__name__}, not a Linear with bias; "
                "analytic FC inversion only recovers the input of a leading Flatten+Linear"
            )
        if not isinstance(module, _TRANSPARENT):
            raise AttackError(
                f"{name} ({type(module).__name__}) precedes the first Linear; the recovered vector would "
                "be its output, not the network input"
            )
    raise AttackError("the model has no Linear layer to invert")


def _row_mask(bias_grad: torch.Tensor, tolerance: float) -> torch.Tensor:
    scale = bias_grad.abs().max()
    if float(scale) == 0.0:
        raise AttackError("the first layer's bias gradient is all zeros; nothing leaks from it")
    return bias_grad.abs() > tolerance * scale


def invert_linear(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor, tolerance: float = RELATIVE_BIAS_TOLERANCE
) -> tuple[torch.Tensor, dict[str, float]]:
    """x from dL/dW = dL/db · xᵀ: the least-squares fit over rows with non-negligible dL/db.

    This is the average of the per-row ratios dL/dW_j / dL/db_j weighted by (dL/db_j)², which
    keeps tiny, noise-dominated rows from dominating a plain mean. The relative residual of
    the rank-one fit certifies the result: ~1e-7 for one sample, large for a mixed batch.
    """
    w = weight_grad.detach().double()
    b = bias_grad.detach().double()
    mask = _row_mask(b, tolerance)
    x = (b[mask] @ w[mask]) / (b[mask] @ b[mask])
    residual = torch.linalg.norm(w - torch.outer(b, x)) / torch.linalg.norm(w).clamp_min(1e-30)
    return x, {"rows_used": int(mask.sum()), "rank_one_residual": float(residual)}


def _batch_candidates(w: torch.Tensor, b: torch.Tensor, count: int, tolerance: float) -> torch.Tensor:
    """For batch > 1: per-row ratios of the `count` rows with the largest |dL/db_j|.

    Each row's ratio is Σ_i c_ij x_i / Σ_i c_ij, a mixture of the batch with row-specific
    coefficients, so these are only candidates; they are exact where one sample dominates a row.
    """
    mask = _row_mask(b, tolerance)
    ranked = torch.argsort(b.abs() * mask, descending=True)[: int(mask.sum())]
    order = ranked[torch.arange(count) % len(ranked)]  # repeat rows if the layer is narrower than the batch
    return w[order].double() / b[order].double().unsqueeze(1)


class AnalyticFCInversion:
    """Recover the input of a leading Flatten+Linear layer from its gradient (exact for batch 1)."""

    name = "analytic-fc"

    def __init__(self, tolerance: float = RELATIVE_BIAS_TOLERANCE, clamp: bool = True) -> None:
        self.tolerance = tolerance
        self.clamp = clamp

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        name, _ = _first_linear(update)
        w = update.gradients[f"{name}.weight"]
        b = update.gradients[f"{name}.bias"]
        x, diagnostics = invert_linear(w, b, self.tolerance)
        if update.batch_size == 1:
            inputs = x.unsqueeze(0)
        else:
            inputs = _batch_candidates(w, b, update.batch_size, self.tolerance)
        inputs = inputs.float().reshape(update.batch_size, *update.input_shape)
        if self.clamp:
            inputs = inputs.clamp(0.0, 1.0)
        diagnostics.update(layer=name, exact=update.batch_size == 1, tolerance=self.tolerance)
        return Reconstruction(inputs, _labels_or_none(update), time.perf_counter() - start, diagnostics)


def _labels_or_none(update: ObservedUpdate) -> torch.Tensor | None:
    if update.known_labels is not None:
        return update.known_labels.detach().clone()
    try:
        return recover_labels_idlg(update)
    except AttackError:
        return None
