"""One interface for every attack: an observed update in, a reconstruction out.

`ObservedUpdate` is what a curious server holds for one client: the global model it sent, the
parameter gradients it can derive from the reply, and what else the threat model grants.
`Reconstruction` is the attack's guess plus honest diagnostics (per-layer rank, residuals, time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from models.base import ZooModel, federated_names_of


class AttackError(ValueError):
    """The attack cannot run on this model or update (unsupported layer, wrong shapes, …)."""


@dataclass
class ObservedUpdate:
    """What the server observes of one client's update.

    `gradients` maps each parameter name of `model` to dL/dθ at the model's current weights.
    For multi-step FedAvg updates it is the estimate Δw / (-lr · steps) (see `from_weight_delta`).
    Labels, known or recovered, are training targets (`model.targets(labels)`): what the loss
    and hence the gradient depend on. `approximation` says why an estimate is not the mean
    gradient over the client's steps (its optimiser, frozen parameters), empty when it is: an
    attack's result on an approximate estimate means less, and its report must say so.
    """

    model: ZooModel
    gradients: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int = 1
    known_labels: torch.Tensor | None = None
    # Per-parameter standard deviation of the gradient estimate, when known (weight deltas: the
    # float32 rounding of the weights divided by that parameter's lr * steps, `UNOBSERVED_STD` where
    # its rate was 0); None for exact gradients. Layer-wise inversion weights its equations by it
    # (generalised least squares) when the update's residual confirms it is all the noise there is.
    gradient_noise: dict[str, torch.Tensor] | None = None
    # Why the gradients are only an approximation of the mean gradient over the local steps
    # ("; "-separated reasons); empty for an exact gradient or an exact estimate.
    approximation: str = ""

    def __post_init__(self) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(self.gradients))
        if missing:
            raise AttackError(
                f"gradients missing for parameters {missing}; pass one gradient per named parameter"
            )
        for name, grad in self.gradients.items():
            if name not in params:
                raise AttackError(f"gradient for unknown parameter {name!r}; the model has {sorted(params)}")
            if tuple(grad.shape) != tuple(params[name].shape):
                raise AttackError(
                    f"gradient {name!r} has shape {tuple(grad.shape)} but the parameter has "
                    f"{tuple(params[name].shape)}; send gradients of this model"
                )

    @classmethod
    def from_weight_delta(
        cls,
        model: ZooModel,
        before: Mapping[str, torch.Tensor],
        after: Mapping[str, torch.Tensor],
        learning_rate: float | Mapping[str, float],
        local_steps: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        batch_size: int = 1,
        approximation: str = "",
    ) -> ObservedUpdate:
        """Estimate the gradient from a FedAvg weight delta: g ≈ (w_before − w_after) / (lr · steps).

        Exact for one SGD step (FedSGD); for several steps it is the mean gradient along the local
        trajectory, which layer-wise inversion treats as if it were one gradient. `learning_rate`
        is one rate for every parameter, or each parameter's own (its optimiser group's: a
        family's optimiser may give groups different rates, or rate 0 to a group frozen this
        round). A parameter at rate 0 did not move with its gradient, so its gradient was not
        observed: its estimate is 0 with the "no information" std `UNOBSERVED_STD`, and the
        update's `approximation` names it after the caller's reasons (`approximation`: why the
        client's optimiser step is not lr · gradient, e.g. momentum over several steps).
        """
        if local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {local_steps}")
        rates = _parameter_rates(learning_rate, before)
        grads: dict[str, torch.Tensor] = {}
        noise: dict[str, torch.Tensor] = {}
        for name in before:
            delta = (before[name] - after[name]).detach().float()
            if rates[name] == 0:
                grads[name] = torch.zeros_like(delta)
                noise[name] = torch.full_like(delta, UNOBSERVED_STD)
                continue
            scale = 1.0 / (rates[name] * local_steps)
            grads[name] = delta * scale
            noise[name] = _rounding_std(before[name], after[name], delta, grads[name], scale)
        reason = "; ".join(filter(None, [approximation, unobserved_reason(model, rates)]))
        return cls(
            model, grads, input_shape, num_classes, batch_size, gradient_noise=noise, approximation=reason
        )


# The std of the estimate of a gradient the update did not observe (learning rate 0): it says "no
# information", so a solver weighting its equations by 1 / std² ignores them (zero would claim the
# gradient is exactly 0). Finite, unlike the truth, so that std² and sums of it stay finite even in
# float32 (< 3.4e38) and no attack meets an infinity; no real gradient entry comes near it.
UNOBSERVED_STD = 1e15


def _parameter_rates(
    learning_rate: float | Mapping[str, float], before: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """One finite rate >= 0 per parameter of `before` (a single rate: > 0, for all of them)."""
    if not isinstance(learning_rate, Mapping):
        rate = float(learning_rate)
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"learning_rate must be a finite number above 0, got {learning_rate}")
        return dict.fromkeys(before, rate)
    missing = [name for name in before if name not in learning_rate]
    unknown = [name for name in learning_rate if name not in before]
    if missing or unknown:
        raise ValueError(
            f"learning rates do not fit the update (missing {missing[:3]}, unknown {unknown[:3]}); "
            "pass one rate per parameter"
        )
    rates = {name: float(learning_rate[name]) for name in before}
    bad = [name for name, rate in rates.items() if not math.isfinite(rate) or rate < 0]
    if bad:
        raise ValueError(f"learning rates must be finite and >= 0; {bad[0]!r} has {rates[bad[0]]}")
    return rates


def unobserved_reason(model: ZooModel, rates: Mapping[str, float]) -> str:
    """Why some of the update's gradients are not observed: the federated parameters at rate 0
    (frozen this round, or in no optimiser group), named compactly (`compact_names`); empty when
    there are none. Parameters outside the federated model (a frozen pretrained base) never
    train and are not named."""
    if all(rate != 0 for rate in rates.values()):
        return ""
    federated = set(federated_names_of(model))
    frozen = [name for name, rate in rates.items() if rate == 0 and name in federated]
    if not frozen:
        return ""
    names = compact_names(frozen, [name for name in rates if name in federated])
    return f"no gradient observed for {names} (learning rate 0 this round: estimated as 0)"


def compact_names(chosen: Sequence[str], every: Sequence[str]) -> str:
    """`chosen` parameter names, a module all of whose (two or more) parameters are chosen
    written once as `prefix.*`, and "every parameter" when all are chosen, so a note naming a
    frozen layer group stays one line."""
    picked = set(chosen)
    if picked >= set(every):
        return "every parameter"
    out: list[str] = []
    for name in (n for n in every if n in picked):
        parts = name.split(".")
        label = name
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            under = [n for n in every if n.startswith(prefix)]
            if len(under) > 1 and all(n in picked for n in under):
                label = prefix + "*"
                break
        if label not in out:
            out.append(label)
    return ", ".join(out)


def _ulp(values: torch.Tensor) -> torch.Tensor:
    big = values.detach().float().abs()
    return torch.nextafter(big, torch.full_like(big, float("inf"))) - big


def _rounding_std(
    before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, scale: float
) -> torch.Tensor:
    """Std of the float32 rounding errors in grad = (before - after) * scale, per entry: `after`
    as stored, the subtraction and the scaling each err by up to half an ulp of their result
    (uniform: ulp / sqrt(12)). The first dominates unless a weight is about as small as its
    step, where the other two (relative to the gradient) take over."""
    stored = _ulp(torch.maximum(after.detach().float().abs(), before.detach().float().abs())) * scale
    return (torch.sqrt(stored**2 + (_ulp(delta) * scale) ** 2 + _ulp(grad) ** 2) / 12**0.5).float()


def observe_gradient(model: ZooModel, inputs: torch.Tensor, labels: torch.Tensor) -> ObservedUpdate:
    """The exact gradient a client would send for this batch of dataset labels (FedSGD), as the
    server sees it; the labels become targets as in the client's training loop. A parameter the
    loss does not reach (e.g. a contrastive projection head beside the classifier) has gradient 0,
    and so has a frozen one (requires_grad False: its weight delta is zero)."""
    model.zero_grad(set_to_none=True)
    loss = model.loss(model(inputs), model.sample_targets(inputs, labels))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = dict(zip(names, torch.autograd.grad(loss, params, materialize_grads=True), strict=True))
    return ObservedUpdate(
        model=model,
        gradients={
            n: grads[n].detach().clone() if n in grads else torch.zeros_like(p.detach())
            for n, p in model.named_parameters()
        },
        input_shape=tuple(inputs.shape[1:]),
        num_classes=model.spec.num_classes,
        batch_size=int(inputs.shape[0]),
    )


@dataclass
class Reconstruction:
    """An attack's output: reconstructed inputs (B, *input_shape), labels and diagnostics."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Attack(Protocol):
    """Every attack: `name` for reports, `reconstruct` for the work."""

    name: str

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction: ...


def parameter_layers(model: ZooModel) -> list[tuple[str, nn.Module]]:
    """(prefix, module) for every leaf module of `model.layers`, in forward order."""
    layers = model.layers
    if not isinstance(layers, nn.Sequential):
        raise AttackError(
            f"{type(model).__name__} has no flat `layers` nn.Sequential; layer-wise attacks need one"
        )
    return [(f"layers.{i}", m) for i, m in enumerate(layers)]
