"""Replay consistency, the test that makes the replay attack trustworthy: for every registered
family with a differentiable training loss, replaying the client's true samples in the true batch
order through the unrolled local round reproduces the client's real weight delta (fedsim's own
training loop) to float32 tolerance; a family it cannot replay is refused, naming why."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attacks.base import AttackError
from attacks.replay import epoch_batches, local_recipe, unrolled_delta
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.errors import UserInputError
from fedsim.training.local import client_loader, model_for, round_seed, train_locally, training_settings
from models import available_models
from tests.support.optional import require_fortunes, require_minilm, require_smollm2

# Relative error ‖Δ_replay − Δ_client‖ / ‖Δ_client‖ allowed: float32 rounding over a few steps.
TOLERANCE = 1e-5
# Small clients (many partitions), 2 epochs with a partial last batch: every kind of step shows.
SMALL = {"clients": 150, "local-epochs": 2, "batch-size": 4, "rounds": 4, "seed": 3}
# family -> run-config keys, optional requirement; one entry per way of training that differs.
REPLAYED: dict[str, tuple[dict[str, Any], Any]] = {
    "mlp": ({"model": "mlp", "dataset": "digits", "momentum": 0.0}, None),
    "mlp-momentum": ({"model": "mlp", "dataset": "digits", "momentum": 0.9}, None),
    "mlp-fedprox": ({"model": "mlp", "dataset": "digits", "strategy": "fedprox", "proximal-mu": 0.5}, None),
    "mlp-step-cap": ({"model": "mlp", "dataset": "digits", "max-local-steps": 3}, None),
    "lenet": ({"model": "lenet", "dataset": "photos"}, None),
    "cnn6": ({"model": "cnn6", "dataset": "photos", "momentum": 0.0}, None),
    "cnn6-d": ({"model": "cnn6-d", "dataset": "photos"}, None),
    "cnn6-relu": ({"model": "cnn6-relu", "dataset": "photos"}, None),
    "convnet-bn": ({"model": "convnet-bn", "dataset": "photos"}, None),
    "convnet-maxpool": ({"model": "convnet-maxpool", "dataset": "photos"}, None),
    "resnet-mini": ({"model": "resnet-mini", "dataset": "photos"}, None),
    "splash-fnn": ({"model": "splash-fnn", "dataset": "splash", "clients": 800}, None),
    "dam-mlp": ({"model": "dam-mlp", "dataset": "digits"}, None),
    "dam-cnn": ({"model": "dam-cnn", "dataset": "photos"}, None),
    "random-features": ({"model": "random-features", "dataset": "digits"}, None),
    "text-dnn": ({"model": "text-dnn", "dataset": "fortunes-lsa", "clients": 60}, require_fortunes),
    "cloze": ({"model": "cloze", "dataset": "fortunes", "clients": 120}, require_fortunes),
    "minilm": ({"model": "minilm", "dataset": "fortunes-minilm", "clients": 150}, require_minilm),
    "smollm2": (
        {"model": "smollm2", "dataset": "fortunes-smollm2", "clients": 300, "learning-rate": 1e-3},
        require_smollm2,
    ),
}
# Families whose local round is more than optimiser steps over a loss: refused, and why.
REFUSED = {
    "ledl": "not trained by gradients",
    "ulmfit": "learning rates change at every step",
    "hybrid-sc": "before_local_training hook",
    "hybrid-psc": "before_local_training hook",
    "ltw": "before_local_training hook",
    "protopnet": "after_local_training hook",
}


def test_every_family_is_either_replayed_or_refused_with_its_reason() -> None:
    replayed = {keys["model"] for keys, _ in REPLAYED.values()}
    assert replayed | set(REFUSED) == set(available_models())
    assert not replayed & set(REFUSED)


# The pretrained families load their weights (tens of seconds on 2 cores): slow, still run in CI.
CASES = [
    pytest.param(c, marks=pytest.mark.slow) if c in ("minilm", "smollm2") else c for c in sorted(REPLAYED)
]


@pytest.mark.parametrize("case", CASES)
def test_replaying_the_true_samples_reproduces_the_clients_delta(case: str) -> None:
    keys, requirement = REPLAYED[case]
    if requirement is not None:
        requirement()
    config = RunConfig.from_mapping({**SMALL, **keys})
    server_round, partition = 2, 1
    try:
        data = client_data(config, partition)
    except UserInputError as err:  # an optional dataset not installed
        pytest.skip(str(err))
    model = model_for(config)
    mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
    recipe = local_recipe(model, training_settings(config), server_round, proximal_mu=mu)
    seed = round_seed(config, server_round, partition)
    orders = _batch_orders(data, config, seed)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(seed)  # the same dropout masks as the client's loop draws
    replayed = unrolled_delta(model, recipe, data.x_train, data.y_train, orders, differentiable=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the replay moved the model"

    train_locally(model, data, config, server_round, partition, proximal_mu=mu)
    moved = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    assert set(replayed) == {n for n, d in moved.items() if d.abs().sum() > 0} | set(replayed)
    assert all(not moved[n].any() for n in moved if n not in replayed), "a parameter the recipe froze moved"
    true = torch.cat([moved[n].flatten() for n in replayed])
    error = torch.cat([(replayed[n].detach() - moved[n]).flatten() for n in replayed])
    assert float(error.norm() / true.norm()) < TOLERANCE, (
        f"relative error {float(error.norm() / true.norm()):.2e}"
    )
    assert len(orders) == recipe.steps(len(data.y_train))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_family_that_cannot_be_replayed_is_refused_naming_why(family: str) -> None:
    dataset = {"ulmfit": "fortunes", "ltw": "fortunes", "hybrid-sc": "digits", "hybrid-psc": "digits"}.get(
        family, "digits"
    )
    if dataset == "fortunes":
        require_fortunes()
    config = RunConfig.from_mapping({**SMALL, "model": family, "dataset": dataset})
    with pytest.raises(AttackError, match=REFUSED[family]):
        local_recipe(model_for(config), training_settings(config), 1)


def test_the_unrolled_delta_is_differentiable_in_the_samples() -> None:
    """What the attack needs: ∂Δw/∂x exists and is not zero (second-order autograd through SGD)."""
    config = RunConfig.from_mapping({**SMALL, "model": "mlp", "dataset": "digits"})
    model = model_for(config)
    recipe = local_recipe(model, training_settings(config), 1)
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    delta = unrolled_delta(model, recipe, x, torch.arange(6), epoch_batches(6, recipe))
    (grad,) = torch.autograd.grad(sum(d.square().sum() for d in delta.values()), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def _batch_orders(data: Any, config: RunConfig, seed: int) -> list[torch.Tensor]:
    """The client's batches, as its own loader draws them for this seed (the true order)."""
    loader = client_loader(data, config.batch_size, seed)
    batches = [indices for _ in range(config.local_epochs) for _, _, indices in loader]
    return batches[: config.max_local_steps or None]
