"""Models whose leakage bound is known in closed form: a fixed linear mixing read out by a negative logit."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from models import InputSpec
from models.base import ZooModel

# A fixed 9x6 map with singular values from 2 down to 0.1: its pseudo-inverse amplifies noise
# unevenly, so a bound that ignored it (or got one singular value wrong) would miss by far.
SINGULAR = np.array([2.0, 1.0, 0.5, 0.3, 0.2, 0.1])


def mixing_matrix() -> Tensor:
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((9, 6)))
    right, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    return torch.from_numpy(left @ np.diag(SINGULAR) @ right.T)


class NegativeLogit(ZooModel):
    """x -> A x (frozen) -> Linear(9, 3), trained on the negative logit of the true class: the
    true class's weight-gradient row is -A x, linear in x, and nothing else depends on x, so the
    least-squares reconstruction from the noisy gradient is the minimum-variance unbiased one."""

    def __init__(self, mixing: Tensor) -> None:
        super().__init__(InputSpec.features(6, 3))
        self.mix = nn.Linear(6, 9, bias=False).requires_grad_(False)
        self.out = nn.Linear(9, 3)
        with torch.no_grad():
            self.mix.weight.copy_(mixing)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.out(self.mix(inputs))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return -outputs.gather(1, targets[:, None]).mean()
