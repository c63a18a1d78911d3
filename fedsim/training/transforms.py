"""Client-side transformations: what a client does to its training triple before the loop.

Shaped like Opacus's front door, `make_private(module, optimizer, data_loader) -> (module,
optimizer, data_loader)`: a transformation may wrap the module (per-sample gradients), the
optimiser (clipping, noise, sparsification) and the data loader (Poisson sampling). The loop
trains whatever it is given; afterwards each transformation unwraps its module, in reverse
order, so the weights reported are the model's own.

The registry maps a name (the `--client-transforms` list) to a factory that reads its settings
from the run config. It has no production entry yet; DP-SGD, clipping and sparsification go here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError


class ClientTransformation(Protocol):
    """One client-side transformation of the training triple."""

    name: str

    def wrap(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """The triple the loop trains with; the returned module must share the given one's
        parameters (train them, not copies)."""
        ...

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The module `wrap` was given, with anything wrap attached (hooks) removed."""
        ...


TransformationFactory = Callable[[RunConfig], ClientTransformation]

TRANSFORMATIONS: dict[str, TransformationFactory] = {}


def available_transformations() -> list[str]:
    return sorted(TRANSFORMATIONS)


def check_transformation_names(names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(TRANSFORMATIONS))
    if unknown:
        choices = ", ".join(available_transformations()) or "none are registered yet"
        raise UserInputError(
            f"unknown client transformation(s) {', '.join(unknown)}; choose from: {choices}, "
            "or pass an empty --client-transforms"
        )


def build_transformations(config: RunConfig) -> list[ClientTransformation]:
    """The run's transformations, in the order they wrap the triple."""
    names = config.transformation_names()
    check_transformation_names(names)
    return [TRANSFORMATIONS[name](config) for name in names]


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
