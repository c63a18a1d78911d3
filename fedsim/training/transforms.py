"""Client-side transformations: what a client does to its training triple and to its update.

Shaped like Opacus's front door, `make_private(module, optimizer, data_loader) -> (module,
optimizer, data_loader)`: a transformation may wrap the module (per-sample gradients), the
optimiser (clipping, noise) and the data loader (Poisson sampling). The loop trains whatever it
is given; afterwards each transformation unwraps its module, in reverse order, so the weights
reported are the model's own. Then, in list order, each may transform the finished update
(`finish`: clip, sparsify, noise the update w_local − w_global).

The registry maps a name (the `--defence` list) to an entry: a factory that reads its settings
from the run config, a one-line description and the knobs it reads (`fedsim defences`). The
built-in defences live in `fedsim.training.defences`, which registers them when the package is
imported. After a round each transformation says what it did (`label`, shown in every audit row
of the update) and what privacy it spent by its own accountant (`privacy_spent`), which the
client reports to the server's privacy ledger.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError


@dataclass(frozen=True)
class PrivacySpend:
    """What a client-side mechanism spent in one local round, by its own accountant."""

    mechanism: str  # the transformation's name, e.g. "dp-sgd"
    epsilon: float  # this round's ε at `delta`
    delta: float
    noise_multiplier: float
    clip_norm: float  # per-sample clipping norm
    sample_rate: float  # q the accountant assumed
    steps: int
    sampling: str  # how batches were drawn: "poisson", or "shuffle" (the ε then assumes Poisson)


class ClientTransformation(Protocol):
    """One client-side transformation of the training triple."""

    name: str

    @property
    def label(self) -> str:
        """The transformation and its strength as audit rows name it, e.g. `dp-sgd(z=1.1,C=1)`."""
        ...

    def privacy_spent(self) -> PrivacySpend | None:
        """After `unwrap`: the privacy this round spent (None for mechanisms without accounting)."""
        ...

    def wrap(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """The triple the loop trains with; the returned module must share the given one's
        parameters (train them, not copies)."""
        ...

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The module `wrap` was given, with anything wrap attached (hooks) removed."""
        ...

    def finish(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> None:
        """After every unwrap and the model's round hook: transform the update, the model's state
        minus `global_state` (the round's starting values of the entries the client sends, and only
        those: entries not sent are no part of the update), in place; `generator` is the
        round's seeded stream for any noise. Transformations of the training triple do nothing."""
        ...


@dataclass(frozen=True)
class TransformationEntry:
    """One registered transformation: how to build it and what `fedsim defences` says about it."""

    build: Callable[[RunConfig], ClientTransformation]
    description: str
    knobs: tuple[str, ...]  # the run-config keys it reads


TRANSFORMATIONS: dict[str, TransformationEntry] = {}


def available_transformations() -> list[str]:
    return sorted(TRANSFORMATIONS)


def check_transformation_names(names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(TRANSFORMATIONS))
    if unknown:
        choices = ", ".join(available_transformations()) or "none are registered yet"
        raise UserInputError(
            f"unknown client transformation(s) {', '.join(unknown)}; choose from: {choices}, "
            "or pass an empty --defence"
        )


def build_transformations(config: RunConfig) -> list[ClientTransformation]:
    """The run's transformations, in the order they wrap the triple."""
    names = config.transformation_names()
    check_transformation_names(names)
    return [TRANSFORMATIONS[name].build(config) for name in names]


def wrap_all(
    transformations: Sequence[ClientTransformation],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    for transformation in transformations:
        module, optimizer, data_loader = transformation.wrap(module, optimizer, data_loader)
    return module, optimizer, data_loader


def unwrap_all(transformations: Sequence[ClientTransformation], module: nn.Module, model: nn.Module) -> None:
    """Undo every wrap, innermost last; a chain that does not end at `model` is a bug in a
    transformation, and reporting its weights would send something else than the model."""
    for transformation in reversed(transformations):
        module = transformation.unwrap(module)
    if module is not model:
        raise RuntimeError(
            f"client transformations {[t.name for t in transformations]} did not unwrap to the model"
        )


def finish_all(
    transformations: Sequence[ClientTransformation],
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    generator: torch.Generator,
) -> None:
    """Transform the finished update in list order, so `clip,gaussian` clips, then noises."""
    for transformation in transformations:
        transformation.finish(model, global_state, generator)
