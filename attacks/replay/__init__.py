"""Replaying a client's local training inside autograd (Dimitrov et al., "Data Leakage in
Federated Averaging", TMLR 2022; breaching's multi-step objective).

`recipe` reads what the server knows of the client's training (the family's own optimiser for the
round, epochs, batch size, step cap, FedProx's μ) into plain data; `optimisers` steps SGD and
Adam(W) functionally, as torch does, so the steps stay differentiable; `unroll` runs the whole
local round on given samples and returns the weight delta it produces, differentiable with
respect to the samples. The attack built on it matches that delta to the observed one.
"""

from attacks.replay.recipe import LocalRecipe, local_recipe, replay_refusal
from attacks.replay.unroll import epoch_batches, unrolled_delta

__all__ = ["LocalRecipe", "epoch_batches", "local_recipe", "replay_refusal", "unrolled_delta"]
