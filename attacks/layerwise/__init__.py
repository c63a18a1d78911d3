"""Layer-wise inversion (R-GAP / COPA): the attack, and the rank API the security metric builds on.

Everything outside this folder imports from here: `LayerwiseInversion` (the attack) and the
pieces `audits.security.metric` counts ranks with (the network plan, each layer's system, the
pull-back through the ops between layers). The modules inside are the mechanism:
`network_plan` (which layers, in what order) -> `layer_ops` (pull-backs through activations,
norms, pooling) -> `systems` / `generic_systems` (each layer's linear system) -> `noise`
(generalised least squares under the update's noise) -> `head` / `hybrid` -> `attack`.
"""

from attacks.layerwise.attack import LayerwiseInversion
from attacks.layerwise.generic_systems import constrained_rank
from attacks.layerwise.layer_ops import pull_back
from attacks.layerwise.network_plan import NetworkPlan, PlannedLayer, plan_network, weight_of
from attacks.layerwise.systems import DEFAULT_BLAS_THREADS, RANK_RTOL, blas_threads, layer_rank

__all__ = [
    "DEFAULT_BLAS_THREADS",
    "RANK_RTOL",
    "LayerwiseInversion",
    "NetworkPlan",
    "PlannedLayer",
    "blas_threads",
    "constrained_rank",
    "layer_rank",
    "plan_network",
    "pull_back",
    "weight_of",
]
