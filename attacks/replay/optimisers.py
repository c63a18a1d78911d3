"""SGD and Adam(W) as pure functions of (parameters, gradients, state): torch's update rules
written out (torch.optim's single-tensor path), so an unrolled local round stays differentiable
with respect to its samples and reproduces the client's real optimiser to float32 rounding."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class GroupSettings:
    """One parameter's optimiser settings, as its torch param group holds them."""

    kind: str  # "sgd", "adam" or "adamw"
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    maximize: bool = False


def step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    settings: Mapping[str, GroupSettings],
    state: dict[str, dict[str, Tensor | int]],
) -> dict[str, Tensor]:
    """One optimiser step over the parameters in `grads` (the others are returned unchanged);
    `state` (per parameter: momentum buffer, Adam moments and step count) is updated in place."""
    updated = dict(params)
    for name, grad in grads.items():
        group = settings[name]
        mine = state.setdefault(name, {})
        if group.kind == "sgd":
            updated[name] = _sgd(params[name], grad, group, mine)
        else:
            updated[name] = _adam(params[name], grad, group, mine)
    return updated


def _sgd(param: Tensor, grad: Tensor, group: GroupSettings, state: dict[str, Tensor | int]) -> Tensor:
    d_p = -grad if group.maximize else grad
    if group.weight_decay:
        d_p = d_p + group.weight_decay * param
    if group.momentum:
        buffer = state.get("momentum")
        buffer = d_p if buffer is None else group.momentum * buffer + (1 - group.dampening) * d_p
        state["momentum"] = buffer
        d_p = d_p + group.momentum * buffer if group.nesterov else buffer
    return param - group.lr * d_p


def _adam(param: Tensor, grad: Tensor, group: GroupSettings, state: dict[str, Tensor | int]) -> Tensor:
    grad = -grad if group.maximize else grad
    if group.weight_decay and group.kind == "adam":
        grad = grad + group.weight_decay * param
    if group.weight_decay and group.kind == "adamw":
        param = param * (1 - group.lr * group.weight_decay)
    beta1, beta2 = group.betas
    count = int(state.get("step", 0)) + 1
    first = state.get("exp_avg")
    second = state.get("exp_avg_sq")
    first = (1 - beta1) * grad if first is None else beta1 * first + (1 - beta1) * grad
    second = (1 - beta2) * grad * grad if second is None else beta2 * second + (1 - beta2) * grad * grad
    state.update(step=count, exp_avg=first, exp_avg_sq=second)
    bias1, bias2 = 1 - beta1**count, 1 - beta2**count
    denominator = second.sqrt() / math.sqrt(bias2) + group.eps
    return param - (group.lr / bias1) * first / denominator
