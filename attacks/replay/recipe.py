"""What the server knows of a client's local round, read into plain data: the family's own
optimiser for the round (built by `ZooModel.configure_optimizer` with the settings the server
itself configured), the epochs, the batch size, the step cap and FedProx's μ."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import AttackError
from attacks.replay.optimisers import GroupSettings
from models.base import TrainingSettings, ZooModel

# Optimiser classes the replay steps functionally, by the name `GroupSettings.kind` gives them.
OPTIMISERS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


@dataclass(frozen=True)
class LocalRecipe:
    """A client's local round as the server configured it: per trained parameter its optimiser
    settings (frozen ones are absent), and the loop around the steps."""

    groups: dict[str, GroupSettings]
    epochs: int
    batch_size: int
    max_steps: int = 0  # 0: no cap
    proximal_mu: float = 0.0

    def steps(self, samples: int) -> int:
        """Local steps over `samples` samples: ⌈n / B⌉ a epoch (the last batch partial), capped."""
        total = self.epochs * -(-samples // self.batch_size)
        return min(total, self.max_steps) if self.max_steps else total


def local_recipe(
    model: ZooModel, settings: TrainingSettings, server_round: int, proximal_mu: float = 0.0
) -> LocalRecipe:
    """The recipe of `model`'s local round `server_round`; AttackError where the round is not
    a plain loop of optimiser steps over the family's training loss (a hook that trains or edits
    weights around the loop, a per-step schedule, an optimiser the replay does not step)."""
    refusal = replay_refusal(model)
    if refusal:
        raise AttackError(f"{model.name} cannot be replayed: {refusal}")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        optimiser = model.configure_optimizer(settings, server_round)
    finally:  # a family may toggle requires_grad for its round: the model stays as it was
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    kind = OPTIMISERS.get(type(optimiser))
    if kind is None:
        raise AttackError(
            f"{model.name} trains with {type(optimiser).__name__}, which the replay does not step"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    groups: dict[str, GroupSettings] = {}
    for group in optimiser.param_groups:
        if group.get("amsgrad"):
            raise AttackError(f"{model.name} uses AMSGrad, which the replay does not step")
        if float(group["lr"]) == 0:
            continue  # a group frozen this round (e.g. DAM's β in its cold start)
        common = {
            "kind": kind,
            "lr": float(group["lr"]),
            "weight_decay": float(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }
        if kind == "sgd":
            extra = {
                "momentum": float(group.get("momentum", 0.0)),
                "dampening": float(group.get("dampening", 0.0)),
                "nesterov": bool(group.get("nesterov", False)),
            }
        else:
            extra = {"betas": tuple(float(b) for b in group["betas"]), "eps": float(group["eps"])}
        for param in group["params"]:
            if param.requires_grad:
                groups[names[id(param)]] = GroupSettings(**common, **extra)
    return LocalRecipe(
        groups, settings.local_epochs, settings.batch_size, settings.max_local_steps, proximal_mu
    )


def replay_refusal(model: ZooModel) -> str:
    """Why `model`'s local round is more than optimiser steps over its training loss, or ""."""
    if not model.trained_by_gradients:
        return "it is not trained by gradients"
    if model.step_schedule:
        return f"its learning rates change at every step ({model.step_schedule})"
    for hook in ("before_local_training", "after_local_training"):
        if getattr(type(model), hook) is not getattr(ZooModel, hook):
            return f"its {hook} hook changes the round beyond the optimiser's steps"
    return ""
