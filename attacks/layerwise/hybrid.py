"""COPA's hybrid step (Chen & Campbell, CangxiongChen/training-data-leakage `hybrid.py`).

Where a layer's linear system is rank-deficient, its least-squares solution is only the
minimum-norm member of an affine set. The hybrid step refines it with Adam on

    w_cos * (1 - cos(grad of the sub-network from this layer up, observed grad))
  + w_sq  * ||A x - b||^2 / ||b||^2        (the layer's system as a soft constraint)
  + w_tv  * TV(x) / mean|x0|                (a smoothness prior on the layer's input)

initialised from the least-squares solution. COPA runs 10,000 (first layer) / 2,000 iterations;
the default here is modest so that audits and tests stay fast. Note what the step can and cannot
do: directions in the exact null space of [K; W] change neither the layer's gradient nor its
output, so the sub-network gradient cannot see them; only the prior (TV) moves along them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attacks.layerwise.network_plan import PlannedLayer


@dataclass(frozen=True)
class HybridConfig:
    """Adam settings and loss weights of the hybrid refinement (lr is relative to std(x0))."""

    steps: int = 200
    lr: float = 0.01
    cos_weight: float = 1.0
    linear_weight: float = 1.0
    tv_weight: float = 1e-2


def _sub_network(model: nn.Module, start: int) -> tuple[nn.Sequential, list[tuple[str, nn.Parameter]]]:
    layers = list(model.layers)
    params = [
        (f"layers.{j}.{name}", p)
        for j in range(start, len(layers))
        for name, p in layers[j].named_parameters()
    ]
    return nn.Sequential(*layers[start:]), params


def _linear_part(layer: PlannedLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    module = layer.module
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, stride=module.stride, padding=module.padding)


def _tv(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def refine_layer(
    model: nn.Module,
    layer: PlannedLayer,
    x0: np.ndarray,
    k: np.ndarray,
    z: np.ndarray,
    alpha: float,
    grads: dict[str, np.ndarray],
    label: int,
    config: HybridConfig,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Refine a rank-deficient layer's input x0 (flat) and return it with a short log."""
    start = time.perf_counter()
    sub, params = _sub_network(model, layer.module_index)
    targets = [torch.from_numpy(grads[name]).float() for name, _ in params]
    target_norm = torch.sqrt(sum((t * t).sum() for t in targets))
    weight = layer.module.weight.detach().clone().requires_grad_(True)
    k_t = torch.from_numpy(k.reshape(1, *layer.out_shape)).float()
    z_t = torch.from_numpy(z.reshape(1, *layer.out_shape)).float()
    g_layer = torch.from_numpy(grads[layer.weight_name]).float()
    b_norm = float(alpha**2 * (g_layer**2).sum() + (z_t**2).sum())
    x = torch.tensor(x0.reshape(1, *layer.in_shape), dtype=torch.float32, requires_grad=True)
    scale = float(np.std(x0)) + 1e-12
    tv_scale = float(np.mean(np.abs(x0))) + 1e-12
    optimizer = torch.optim.Adam([x], lr=config.lr * scale)
    target = torch.tensor([label])

    def objective() -> tuple[torch.Tensor, float]:
        loss = model.loss(sub(x), target)
        g = torch.autograd.grad(loss, [p for _, p in params], create_graph=True)
        dot = sum((gi * ti).sum() for gi, ti in zip(g, targets, strict=True))
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g)) + 1e-30
        cos = dot / (norm * target_norm)
        wx = _linear_part(layer, x, weight)
        kx = torch.autograd.grad((k_t * wx).sum(), weight, create_graph=True)[0]
        linear = (alpha**2 * ((kx - g_layer) ** 2).sum() + ((wx - z_t) ** 2).sum()) / b_norm
        tv = _tv(x) / tv_scale
        total = config.cos_weight * (1 - cos) + config.linear_weight * linear + config.tv_weight * tv
        return total, float(cos.detach())

    best_x, best_loss, first = x.detach().clone(), float("inf"), None
    for _ in range(max(config.steps, 0) + 1):
        optimizer.zero_grad()
        total, cos = objective()
        value = float(total.detach())
        if first is None:
            first = (value, cos)
        if value < best_loss:
            best_loss, best_x = value, x.detach().clone()
        (x.grad,) = torch.autograd.grad(total, [x])
        optimizer.step()
    info = {
        "steps": config.steps,
        "loss_start": first[0] if first else None,
        "cos_start": first[1] if first else None,
        "loss_best": best_loss,
        "seconds": time.perf_counter() - start,
    }
    return best_x.double().numpy().ravel(), info
