"""The one interface every model of the zoo implements.

A federation, an auditor and an attack all need the same three things from a model: build it
from a config, compute its training loss (which some families replace with special losses), and
run one optimisation step. Keeping them on the model lets a client train any family unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class InputSpec:
    """What the data looks like: channel-first sample shape and number of classes."""

    shape: tuple[int, ...]
    num_classes: int

    @property
    def num_features(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size


class ZooModel(nn.Module):
    """Base class: a classifier whose loss and training step can be overridden per family."""

    name: str = "zoo-model"

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """How dataset labels become training targets (and what a recovered label is compared
        with): the class id itself here; e.g. its parity for a single-logit head."""
        return labels

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy by default; families with special objectives override this."""
        return F.cross_entropy(outputs, targets)

    def training_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        regulariser: torch.Tensor | None = None,
    ) -> float:
        """One optimiser step; `regulariser` lets the caller add e.g. FedProx's proximal term."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self(inputs), targets)
        total = loss if regulariser is None else loss + regulariser
        total.backward()
        optimizer.step()
        return float(loss.detach())

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Class predictions from outputs (a single-logit head thresholds at zero)."""
        if outputs.shape[-1] == 1:
            return (outputs.squeeze(-1) > 0).long()
        return outputs.argmax(dim=-1)
