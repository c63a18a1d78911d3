"""What a client's local step was, as the server can know it: one truth for reading a gradient
out of a weight delta.

The auditor estimates a client's gradient as Δw / (lr · steps). That is the mean gradient over the
local steps only for plain SGD at a rate fixed for the round, and every family builds its own
optimiser (`ZooModel.configure_optimizer`: per-group rates, groups frozen by round, Adam,
momentum, a schedule set every step). The server holds the round's model and the run's settings,
so it builds that same optimiser once per round and reads it (`client_step`): each parameter's
learning rate as the optimiser starts the round (0 for a frozen group, a parameter in no group or
one with requires_grad off) and every reason the estimate is only approximate.

Building it leaves the model as it was (`_untouched`): a family's `configure_optimizer` toggles
requires_grad flags and sets round state (ProtoPNet's stage, ULMFiT's schedule, text-dnn's
pretraining layer, the hybrid's α), and the audit reads both (gradient matching attacks the
parameters that require grad; a frozen-base family's federated names are its trainable ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from attacks.base import ObservedUpdate, unobserved_reason
from fedsim.config.run_config import RunConfig
from fedsim.training.local import training_settings
from models import TrainingSettings, ZooModel


@dataclass(frozen=True)
class ClientStep:
    """One round's client step as the server reconstructs it (picklable plain data).

    `rates`: every parameter of the model (in its order) -> the learning rate its optimiser group
    starts the round with, as `configure_optimizer` builds it (a family with a `step_schedule`
    changes it at every step: one of the reasons). Why Δw / (lr · steps) is not the mean gradient
    over the local steps: `reasons` hold at any number of steps, `multi_step_reasons` from the
    second step on (momentum from a zero buffer and FedProx's proximal term change nothing at the
    first), `unobserved` names the federated parameters at rate 0. A reason depends on the number
    of steps, which each reply reports: ask `reason(local_steps)`.
    """

    rates: Mapping[str, float]
    reasons: tuple[str, ...] = ()
    multi_step_reasons: tuple[str, ...] = ()
    unobserved: str = ""

    @property
    def frozen(self) -> tuple[str, ...]:
        """The parameters that do not move this round (rate 0), in model order."""
        return tuple(name for name, rate in self.rates.items() if rate == 0)

    def optimiser_reason(self, local_steps: int) -> str:
        """Why the optimiser's `local_steps` steps are not lr · steps · mean gradient (frozen
        parameters aside); empty when they are."""
        later = self.multi_step_reasons if local_steps > 1 else ()
        return "; ".join((*self.reasons, *later))

    def reason(self, local_steps: int) -> str:
        """Why the estimate from `local_steps` steps is approximate, empty when it is exact: the
        `approximation` of the update `observe` builds."""
        return "; ".join(filter(None, [self.optimiser_reason(local_steps), self.unobserved]))

    def observe(
        self,
        model: ZooModel,
        before: Mapping[str, torch.Tensor],
        after: Mapping[str, torch.Tensor],
        local_steps: int,
        batch_size: int,
    ) -> ObservedUpdate:
        """The gradient estimate of one update of `model` (the round model this step was read
        from): each parameter's delta over its own rate and the steps, the reasons attached."""
        return ObservedUpdate.from_weight_delta(
            model, before, after,
            self.rates, local_steps, tuple(model.spec.shape), model.spec.num_classes, batch_size,
            approximation=self.optimiser_reason(local_steps),
        )  # fmt: skip


@dataclass(frozen=True)
class ClientTraining:
    """What the server knows of how every client trains: the run's training settings and the
    FedProx μ the strategy sends (0 under any other strategy). Picklable, for audit workers."""

    settings: TrainingSettings
    proximal_mu: float = 0.0

    @classmethod
    def of(cls, config: RunConfig) -> ClientTraining:
        """The run's: its settings as a client's model sees them, μ only under fedprox (the
        strategy that sends it; see `fedsim.strategy.aggregators.build_strategy`)."""
        mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
        return cls(training_settings(config), mu)

    @classmethod
    def plain_sgd(cls, learning_rate: float) -> ClientTraining:
        """Plain SGD at one rate, no momentum (what a caller passing a bare rate means)."""
        return cls(TrainingSettings(learning_rate=float(learning_rate)))

    def step(self, model: ZooModel, server_round: int) -> ClientStep:
        return client_step(model, self.settings, server_round, self.proximal_mu)


def client_step(
    model: ZooModel, settings: TrainingSettings, server_round: int, proximal_mu: float = 0.0
) -> ClientStep:
    """The client step of `server_round`, read from the optimiser the family builds for it, on the
    server's round model (left as it was). ValueError for a family not trained by gradients (its
    clients build no optimiser) or a negative or non-finite μ."""
    if not model.trained_by_gradients:
        raise ValueError(
            f"{model.name} is not trained by gradients: its clients take no optimiser step to read"
        )
    if not math.isfinite(proximal_mu) or proximal_mu < 0:
        raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu}")
    with _untouched(model):
        optimizer = model.configure_optimizer(settings, server_round)
        rates = _rates(model, optimizer)
        reasons, later = _reasons(model, optimizer, proximal_mu)
    return ClientStep(rates, reasons, later, unobserved_reason(model, rates))


def _rates(model: ZooModel, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter's group rate; 0 outside every group or with requires_grad off (the
    optimiser skips a parameter that gets no gradient)."""
    group_rate = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    return {
        name: group_rate.get(id(p), 0.0) if p.requires_grad else 0.0 for name, p in model.named_parameters()
    }


def _reasons(
    model: ZooModel, optimizer: torch.optim.Optimizer, proximal_mu: float
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(reasons at any number of steps, reasons from the second step on), over the groups that
    train (rate > 0, a parameter that requires grad)."""
    active = [
        g for g in optimizer.param_groups if float(g["lr"]) > 0 and any(p.requires_grad for p in g["params"])
    ]
    always: list[str] = []
    later: list[str] = []
    if type(optimizer) is not torch.optim.SGD:
        always.append(f"{type(optimizer).__name__}: dw is not a scaled gradient")
    else:
        nesterov = _values(g["momentum"] for g in active if g.get("nesterov"))
        momentum = _values(g["momentum"] for g in active if not g.get("nesterov"))
        if nesterov:
            always.append(f"Nesterov momentum {nesterov}: even one step moves by lr*(1 + momentum)*gradient")
        if momentum:
            later.append(f"SGD momentum {momentum}: each step after the first adds the earlier gradients")
    if any(g.get("maximize") for g in active):
        always.append("maximize: the optimiser ascends the gradient")
    decay = _values(g.get("weight_decay", 0.0) for g in active)
    if decay:
        always.append(f"weight decay {decay}: dw includes decay * w")
    if model.step_schedule:
        always.append(f"learning rates change every step ({model.step_schedule})")
    if proximal_mu > 0:
        later.append(
            f"FedProx mu={proximal_mu:g}: the proximal term's gradient mu*(w - w_global) is zero only "
            "at the first step"
        )
    return tuple(always), tuple(later)


def _values(values: Iterable[float]) -> str:
    """The distinct non-zero values, e.g. "0.9" or "0.5, 0.9"; empty when there are none."""
    distinct = sorted({float(v) for v in values if float(v) != 0})
    return ", ".join(f"{v:g}" for v in distinct)


@contextmanager
def _untouched(model: ZooModel) -> Iterator[None]:
    """Leave `model` as it was once the block ends: its requires_grad flags, every module's own
    attributes (round state a family's `configure_optimizer` sets) and torch's global generator."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    attributes = [(module, dict(vars(module))) for module in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, saved in attributes:
            current = vars(module)
            for key in [key for key in current if key not in saved]:
                del current[key]
            current.update(saved)
