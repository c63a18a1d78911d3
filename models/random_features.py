"""Random features (Rahimi & Recht, NIPS 2007) with a trained linear readout: the smallest model
whose federated model is a part of its state.

    input (flattened) -> ReLU(W x + b) with W, b drawn once from `feature_seed`, never trained
                      -> Linear(features, classes), trained

The random layer is a buffer pair (`projection`, `offset`): it is in the state dict, so a
checkpoint *could* hold it, but it is no part of the federated model (`federated_names` is the
readout's weight and bias). Every node draws the same W, b from the same `feature_seed` with its
own generator (not torch's global one, which the run seed drives), so only the readout ever
crosses the wire, is aggregated, checkpointed and audited: the pattern of a frozen pretrained
base, at toy scale. The scale 1/√d of W keeps the pre-activations of [0, 1] inputs O(1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import InputSpec, ZooModel

READOUT = "readout"


class RandomFeatures(ZooModel):
    """ReLU random features from a seeded, frozen projection, then a linear readout."""

    def __init__(self, spec: InputSpec, features: int, feature_seed: int) -> None:
        super().__init__(spec)
        generator = torch.Generator().manual_seed(feature_seed)
        width = spec.num_features
        self.register_buffer(
            "projection", torch.randn(features, width, generator=generator) / math.sqrt(width)
        )
        self.register_buffer("offset", torch.rand(features, generator=generator) * 2 - 1)
        self.readout = nn.Linear(features, spec.num_classes)

    def features(self, inputs: Tensor) -> Tensor:
        return F.relu(inputs.flatten(1) @ self.projection.T + self.offset)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.readout(self.features(inputs))

    def federated_names(self) -> tuple[str, ...]:
        """The readout only: the random layer is rebuilt from `feature_seed` on every node."""
        return (f"{READOUT}.weight", f"{READOUT}.bias")


def random_features(spec: InputSpec, features: int = 512, feature_seed: int = 0) -> RandomFeatures:
    """ReLU random features (a frozen projection to `features` units, drawn from `feature_seed`,
    the same on every node) and a trained linear readout, the only federated part; takes images
    (flattened) or feature vectors."""
    if features < 1:
        raise ValueError(f"features must be at least 1 (got {features}); e.g. features=512")
    if feature_seed < 0:
        raise ValueError(f"feature_seed must be >= 0 (got {feature_seed}); e.g. feature_seed=0")
    return RandomFeatures(spec, features, feature_seed)
