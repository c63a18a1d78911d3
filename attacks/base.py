"""One interface for every attack: an observed update in, a reconstruction out.

`ObservedUpdate` is what a curious server holds for one client: the global model it sent, the
parameter gradients it can derive from the reply, and what else the threat model grants.
`Reconstruction` is the attack's guess plus honest diagnostics (per-layer rank, residuals, time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from models.base import ZooModel


class AttackError(ValueError):
    """The attack cannot run on this model or update (unsupported layer, wrong shapes, …)."""


@dataclass
class ObservedUpdate:
    """What the server observes of one client's update.

    `gradients` maps each parameter name of `model` to dL/dθ at the model's current weights.
    For multi-step FedAvg updates it is the estimate Δw / (-lr · steps) (see `from_weight_delta`).
    Labels, known or recovered, are training targets (`model.targets(labels)`): what the loss
    and hence the gradient depend on.
    """

    model: ZooModel
    gradients: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int = 1
    known_labels: torch.Tensor | None = None
    # Per-parameter standard deviation of the gradient estimate, when known (weight deltas: the
    # float32 rounding of the weights divided by lr * steps); None for exact gradients. Layer-wise
    # inversion weights its equations by it (generalised least squares) when the update's
    # residual confirms it is all the noise there is.
    gradient_noise: dict[str, torch.Tensor] | None = None

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
        learning_rate: float,
        local_steps: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        batch_size: int = 1,
    ) -> ObservedUpdate:
        """Estimate the gradient from a FedAvg weight delta: g ≈ (w_before − w_after) / (lr · steps).

        Exact for one SGD step (FedSGD); for several steps it is the mean gradient along the local
        trajectory, which layer-wise inversion treats as if it were one gradient.
        """
        scale = 1.0 / (learning_rate * local_steps)
        deltas = {name: (before[name] - after[name]).detach().float() for name in before}
        grads = {name: delta * scale for name, delta in deltas.items()}
        noise = {
            name: _rounding_std(before[name], after[name], deltas[name], grads[name], scale)
            for name in before
        }
        return cls(model, grads, input_shape, num_classes, batch_size, gradient_noise=noise)


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
