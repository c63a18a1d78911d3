"""What ProtoPNet's federated push gives the server: one latent patch per prototype, inverted back
to pixels.

A push record holds, per prototype, a D-dimensional latent vector z[:, h, w] of one of the client's
training images. The server knows the global model, so it can search for an input whose latent
vector at (h, w) is that vector: Adam on the pixels, boxed to the data range, from a constant grey
start (no image prior). Only the receptive field of (h, w) can influence z[:, h, w], so that
window of the image is what the push can reveal and what the inversion is scored on (PSNR).
The attacker is given the position (h, w); a position-blind one would try every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.protopnet import ProtoPNet


def receptive_field(
    features: nn.Sequential, row: int, col: int, size: tuple[int, int]
) -> tuple[slice, slice]:
    """The input window (rows, cols) that latent position (row, col) sees through `features`
    (convs and pools only; 1x1 add-on convs see no further), clipped to the image `size`."""
    start, end = [row, col], [row, col]
    for layer in reversed(list(features)):
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            kernel, stride, padding = (_pair(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
            for axis in (0, 1):
                start[axis] = start[axis] * stride[axis] - padding[axis]
                end[axis] = end[axis] * stride[axis] - padding[axis] + kernel[axis] - 1
    return (
        slice(max(start[0], 0), min(end[0], size[0] - 1) + 1),
        slice(max(start[1], 0), min(end[1], size[1] - 1) + 1),
    )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class PatchInversion:
    """The recovered image window, the true one, and how close they are."""

    recovered: Tensor  # (C, h, w), the receptive-field window of the optimised image
    truth: Tensor  # (C, h, w)
    psnr: float  # recovered vs truth, peak = the data range
    baseline_psnr: float  # the grey start vs truth: what knowing nothing gives
    latent_residual: float  # ‖z(recovered)[:, h, w] − target‖² at the end


def invert_latent_patch(
    model: ProtoPNet,
    target: Tensor,
    row: int,
    col: int,
    truth_image: Tensor,
    iterations: int = 300,
    lr: float = 0.05,
) -> PatchInversion:
    """Optimise an image so that its latent vector at (row, col) is `target` (D,); score the
    receptive-field window against `truth_image` (C, H, W). Deterministic (constant start)."""
    low, high = model.spec.value_range or (0.0, 1.0)
    shape = truth_image.shape
    image = torch.full((1, *shape), (low + high) / 2, requires_grad=True)
    optimizer = torch.optim.Adam([image], lr=lr)
    was_training = model.training
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    target = target.detach().reshape(-1)
    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        residual = (model.latent(image)[0, :, row, col] - target).pow(2).sum()
        residual.backward()
        optimizer.step()
        with torch.no_grad():
            image.clamp_(low, high)
    with torch.no_grad():
        residual = float((model.latent(image)[0, :, row, col] - target).pow(2).sum())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train(was_training)
    rows, cols = receptive_field(model.features, row, col, (shape[1], shape[2]))
    recovered = image.detach()[0][:, rows, cols]
    truth = truth_image[:, rows, cols]
    peak = high - low
    return PatchInversion(
        recovered=recovered,
        truth=truth,
        psnr=_psnr(recovered, truth, peak),
        baseline_psnr=_psnr(torch.full_like(truth, (low + high) / 2), truth, peak),
        latent_residual=residual,
    )


def _psnr(estimate: Tensor, truth: Tensor, peak: float) -> float:
    mse = float((estimate - truth).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
