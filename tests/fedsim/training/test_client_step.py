"""The server's one truth of a client's step: each parameter's learning rate read from the family's
own optimiser, and why Δw / (lr · steps) is or is not the mean gradient over the local steps,
checked against real client rounds."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from attacks.base import UNOBSERVED_STD, ObservedUpdate
from fedsim.config.run_config import RunConfig
from fedsim.training.client_step import ClientStep, ClientTraining, client_step
from fedsim.training.local import ProximalTerm
from models import InputSpec, TrainingSettings, ZooModel, build_model
from models.ulmfit import discriminative_rates, slanted_triangular
from tests.support.optional import require_smollm2
from tests.support.protopnet import protopnet_for

IMAGES = InputSpec((3, 8, 8), 10)
FEATURES = InputSpec.features(20, 3)
# One step: |estimate − gradient| stays within about one ulp of the weights over lr, as the
# update's rounding std (ulp / √12) predicts. Several steps: the weights are rounded along the
# trajectory too, which that std does not know of; the estimate is still the mean gradient to a
# few float32 epsilons in norm, where a real bias (momentum, FedProx) is a percent or more.
ROUNDING = 2 * 12**0.5
TRAJECTORY_ROUNDING = 1e-5


def _built(name: str, spec: InputSpec, **options: object) -> ZooModel:
    torch.manual_seed(0)
    return build_model(name, spec, **options)


def _client_round(
    model: ZooModel, settings: TrainingSettings, server_round: int, steps: int, proximal_mu: float = 0.0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A client's local round on its own copy of the round model, as `train_locally` runs it (the
    family's optimiser, FedProx's term when μ > 0), batches of 4 random samples. Returns the
    weights before and after, and the mean over the steps of the training loss's gradient."""
    client = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    optimizer = client.configure_optimizer(settings, server_round)
    proximal = ProximalTerm(client, proximal_mu) if proximal_mu > 0 else None
    client.train()
    mean = {n: torch.zeros_like(p) for n, p in before.items()}
    for _ in range(steps):
        inputs = torch.rand((4, *client.spec.shape), generator=generator)
        labels = torch.randint(0, client.spec.num_classes, (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = client.training_loss(client, inputs, client.sample_targets(inputs, labels))
        named = [(n, p) for n, p in client.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        for (name, _), grad in zip(named, grads, strict=True):
            if grad is not None:
                mean[name] += grad / steps
        (loss if proximal is None else loss + proximal(client)).backward()
        optimizer.step()
    after = {n: p.detach().clone() for n, p in client.named_parameters()}
    return before, after, mean


def _errors(update: ObservedUpdate, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, the largest |estimate − truth| in units of the update's rounding std."""
    assert update.gradient_noise is not None
    return {
        name: float(((update.gradients[name] - truth[name]).abs() / update.gradient_noise[name]).max())
        for name in truth
    }


def _relative_error(update: ObservedUpdate, truth: dict[str, torch.Tensor]) -> float:
    """The largest ‖estimate − truth‖ / ‖truth‖ over the parameters."""
    return max(float((update.gradients[n] - truth[n]).norm() / truth[n].norm()) for n in truth)


def _observed(
    model: ZooModel, settings: TrainingSettings, steps: int, proximal_mu: float = 0.0, server_round: int = 1
) -> tuple[ClientStep, ObservedUpdate, dict[str, torch.Tensor]]:
    step = client_step(model, settings, server_round, proximal_mu)
    before, after, mean = _client_round(model, settings, server_round, steps, proximal_mu)
    return step, step.observe(model, before, after, steps, 4), mean


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
def test_one_sgd_step_of_the_mlp_is_estimated_exactly(momentum: float) -> None:
    """One step of plain SGD, or of SGD with momentum from its zero buffer, moves by lr · g."""
    model = _built("mlp", IMAGES)
    step, update, gradient = _observed(model, TrainingSettings(0.1, momentum=momentum), steps=1)
    assert set(step.rates.values()) == {0.1} and step.frozen == ()
    assert step.reason(1) == update.approximation == ""
    assert max(_errors(update, gradient).values()) <= ROUNDING


def test_momentum_over_two_steps_is_approximate_and_plain_sgd_is_not() -> None:
    model = _built("mlp", IMAGES)
    plain, plain_update, plain_mean = _observed(model, TrainingSettings(0.1), steps=2)
    assert plain.reason(2) == plain_update.approximation == ""
    assert _relative_error(plain_update, plain_mean) <= TRAJECTORY_ROUNDING  # the mean gradient
    heavy, update, mean = _observed(model, TrainingSettings(0.1, momentum=0.9), steps=2)
    assert heavy.reason(1) == "" and heavy.reason(2) == update.approximation
    assert update.approximation.startswith("SGD momentum 0.9: each step after the first")
    assert _relative_error(update, mean) > 0.1, "momentum biases the estimate"


def test_fedprox_over_two_steps_is_approximate_and_over_one_exact() -> None:
    model = _built("mlp", IMAGES)
    settings = TrainingSettings(0.1)
    step, update, mean = _observed(model, settings, steps=2, proximal_mu=1.0)
    assert step.reason(2) == update.approximation and "FedProx mu=1" in update.approximation
    assert _relative_error(update, mean) > 0.01, "μ(w − w_global) enters the step"
    single, one, gradient = _observed(model, settings, steps=1, proximal_mu=1.0)
    assert single.reason(1) == one.approximation == ""
    assert max(_errors(one, gradient).values()) <= ROUNDING


def test_the_run_config_sends_a_proximal_mu_under_fedprox_only() -> None:
    assert ClientTraining.of(RunConfig(strategy="fedprox", proximal_mu=0.05)).proximal_mu == 0.05
    assert ClientTraining.of(RunConfig(strategy="fedavg", proximal_mu=0.05)).proximal_mu == 0.0
    training = ClientTraining.of(RunConfig(learning_rate=0.2, momentum=0.5, rounds=3))
    settings = training.settings
    assert (settings.learning_rate, settings.momentum, settings.rounds, training.proximal_mu) == (
        0.2,
        0.5,
        3,
        0,
    )


def test_ulmfit_groups_start_at_their_discriminative_rates_and_its_schedule_is_named() -> None:
    model = _built(
        "ulmfit", InputSpec.tokens(12, 40, 3), embedding=8, hidden=16, classifier_hidden=6, lm_rounds=1
    )
    settings = TrainingSettings(0.01, rounds=4)
    step = client_step(model, settings, 1)  # the LM stage: embedding, LSTMs, decoder; no classifier
    peaks = dict(zip(["encoder", "rnns.0", "rnns.1", "decoder"], discriminative_rates(0.01, 4), strict=True))
    start = slanted_triangular(0, 1)  # as the optimiser is built: STLR's first multiplier
    for name, rate in step.rates.items():
        group = next((g for g in peaks if name.startswith(f"{g}.")), None)
        assert rate == pytest.approx(0.0 if group is None else peaks[group] * start), name
    assert {n for n in step.frozen} == {n for n in step.rates if n.startswith("classifier.")}
    reason = step.reason(1)
    assert reason.startswith("Adam: dw is not a scaled gradient; learning rates change every step (slanted")
    assert reason.endswith(
        "no gradient observed for classifier.* (learning rate 0 this round: estimated as 0)"
    )
    unfreezing = client_step(model, settings, 2)  # the classifier stage's first round: the head alone
    assert {n for n, r in unfreezing.rates.items() if r > 0} == {
        n for n in step.rates if n.startswith("classifier.")
    }
    assert "encoder.weight, rnns.*, decoder.*" in unfreezing.reason(1)
    assert model._optimizer is None and model._stage == "classifier", "the round state was left behind"


def test_dam_beta_has_rate_0_in_cold_start_rounds_and_is_named() -> None:
    model = _built("dam-mlp", FEATURES, widths="16-16", cold_rounds=2)
    betas = [n for n, _ in model.named_parameters() if n.endswith(".beta")]
    settings = TrainingSettings(0.1, rounds=5)
    step, update, gradient = _observed(model, settings, steps=1)
    assert betas and step.frozen == tuple(betas)
    assert all(rate == 0.1 for name, rate in step.rates.items() if name not in betas)
    named = f"no gradient observed for {', '.join(betas)} (learning rate 0 this round: estimated as 0)"
    assert update.approximation == step.reason(1) == named
    noise = update.gradient_noise
    assert noise is not None
    for name in betas:  # not observed: a zero estimate whose finite std claims nothing
        assert not bool(update.gradients[name].any()) and bool((noise[name] == UNOBSERVED_STD).all())
    errors = _errors(update, gradient)
    assert max(errors[n] for n in errors if n not in betas) <= ROUNDING  # the others are exact
    warm, warm_update, warm_gradient = _observed(model, settings, steps=1, server_round=3)
    assert warm.frozen == () and warm_update.approximation == ""
    assert max(_errors(warm_update, warm_gradient).values()) <= ROUNDING


def test_smollm2_adamw_is_approximate_and_its_frozen_base_is_not_named() -> None:
    require_smollm2()
    model = _built("smollm2", InputSpec.tokens(12, 49152, 6, "smollm2"))
    federated = model.federated_names()
    step = client_step(model, TrainingSettings(1e-3), 1)
    assert step.reason(1) == "AdamW: dw is not a scaled gradient"
    assert {step.rates[n] for n in federated if n in step.rates} == {1e-3}
    assert step.frozen and all(n not in federated for n in step.frozen)  # the base: never trained
    assert model.federated_names() == federated


def test_protopnet_adam_is_approximate_and_its_requires_grad_flags_are_restored() -> None:
    model = protopnet_for()
    settings = TrainingSettings(0.1, rounds=6)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    client = protopnet_for()
    client.configure_optimizer(settings, 1)  # what a client's own model goes through
    assert {n: p.requires_grad for n, p in client.named_parameters()} != flags
    step = client_step(model, settings, 1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    reason = step.reason(1)
    assert reason.startswith("Adam: dw is not a scaled gradient; weight decay")
    assert "no gradient observed for features.*, last_layer.weight" in reason  # the warm stage
    assert all(step.rates[n] == 0 for n in step.rates if n.startswith("features."))


def test_nesterov_is_approximate_even_for_one_step() -> None:
    """Nesterov's first step from a zero buffer is lr · (1 + momentum) · g."""
    model = _built("text-dnn", FEATURES, nesterov=True)
    step = client_step(model, TrainingSettings(0.1, momentum=0.9, rounds=1), 1)
    assert step.reason(1).startswith("Nesterov momentum 0.9: even one step")


def test_a_family_not_trained_by_gradients_has_no_step_to_read() -> None:
    with pytest.raises(ValueError, match="not trained by gradients"):
        client_step(_built("ledl", FEATURES), TrainingSettings(0.1), 1)
    with pytest.raises(ValueError, match="proximal_mu"):
        client_step(_built("mlp", IMAGES), TrainingSettings(0.1), 1, proximal_mu=-1.0)


def test_a_client_step_travels_to_an_audit_worker_intact() -> None:
    step = client_step(
        _built("dam-mlp", FEATURES, widths="16-16", cold_rounds=2), TrainingSettings(0.1, momentum=0.9), 1
    )
    again = pickle.loads(pickle.dumps(step))
    assert again == step and again.reason(2) == step.reason(2) and "momentum" in again.reason(2)
