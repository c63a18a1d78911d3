"""A small ProtoPNet on digits and its latent patches, for the unit and the federation tests."""

from __future__ import annotations

import torch

from models import InputSpec, build_model
from models.protopnet import ProtoPNet

DIGITS = InputSpec.image((1, 8, 8), 10)


def protopnet_for(spec: InputSpec = DIGITS, **options: object) -> ProtoPNet:
    torch.manual_seed(0)
    model = build_model("protopnet", spec, **options)
    assert isinstance(model, ProtoPNet)
    return model


# A latent computed in another batch may differ in the last bit (the conv kernels sum in another
# order): "equal to a real patch" means equal up to that float32 rounding of the forward pass.
FORWARD_ROUNDING = 1e-6


def nearest_gap(patches: torch.Tensor, vector: torch.Tensor) -> float:
    """max |patch − vector| over coordinates, for the closest of `patches` (M, D)."""
    return float((patches - vector).abs().max(dim=1).values.min())


def latent_patches(model: ProtoPNet, inputs: torch.Tensor) -> torch.Tensor:
    """Every 1x1 latent patch of `inputs`, (N, H·W, D)."""
    with torch.no_grad():
        return model.latent(inputs).flatten(2).transpose(1, 2)
