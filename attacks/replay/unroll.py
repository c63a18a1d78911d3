"""A client's local round run again on given samples, inside autograd: the weight delta it
produces, as a function of the samples (and exactly the client's, given the true samples in the
true batch order: the replay-consistency test)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attacks.replay.optimisers import step
from attacks.replay.recipe import LocalRecipe
from models.base import ZooModel


class _TrainingLoss(nn.Module):
    """The family's own step loss as one module call, so `functional_call` swaps the weights for
    every use of them (the forward pass and any the loss makes through the model itself)."""

    def __init__(self, model: ZooModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.model.training_loss(self.model, inputs, targets)


def epoch_batches(samples: int, recipe: LocalRecipe, orders: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The index batches of a local round: each epoch a permutation of the samples (`orders[e]`;
    default the identity) cut into batches of the recipe's size, the last one partial, stopped at
    the step cap: what the client's DataLoader gives."""
    batches: list[Tensor] = []
    for epoch in range(recipe.epochs):
        order = torch.arange(samples) if orders is None else orders[epoch]
        batches += list(torch.split(order, recipe.batch_size))
    return batches[: recipe.steps(samples)]


def unrolled_delta(
    model: ZooModel,
    recipe: LocalRecipe,
    inputs: Tensor,
    labels: Tensor,
    batches: Sequence[Tensor],
    differentiable: bool = True,
) -> dict[str, Tensor]:
    """Δw of every trained parameter after the recipe's steps over `batches` of (inputs, labels),
    from the model's current weights (left untouched). `differentiable` keeps the graph of every
    step (higher-order autograd) so Δw can be differentiated with respect to `inputs`."""
    start = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {f"model.{name}": b.detach().clone() for name, b in model.named_buffers()}
    trained = [name for name in start if name in recipe.groups]
    params = {name: value.clone().requires_grad_(name in recipe.groups) for name, value in start.items()}
    loss_of = _TrainingLoss(model)
    state: dict[str, dict[str, Tensor | int]] = {}
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for batch in batches:
                x, y = inputs[batch], labels[batch]
                weights = {f"model.{name}": value for name, value in params.items()}
                loss = functional_call(loss_of, {**weights, **buffers}, (x, model.sample_targets(x, y)))
                if recipe.proximal_mu > 0:  # FedProx: (μ/2)·‖w − w_global‖² over every parameter
                    loss = loss + 0.5 * recipe.proximal_mu * sum(
                        ((params[n] - start[n]) ** 2).sum() for n in start
                    )
                grads = torch.autograd.grad(loss, [params[n] for n in trained], create_graph=differentiable)
                params = step(params, dict(zip(trained, grads, strict=True)), recipe.groups, state)
    finally:
        model.train(was_training)
    return {name: params[name] - start[name] for name in trained}
