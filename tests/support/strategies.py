"""Strategies that record what the chain hands them, and Flower's own epsilon for a central-DP run."""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedsim.config.run_config import RunConfig
from fedsim.strategy.base import StrategyWrapper


class Counting(StrategyWrapper):
    """A wrapper with state of its own: the rounds it aggregated."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.rounds = 0

    def aggregate_train(self, server_round, replies):
        self.rounds += 1
        return self.inner.aggregate_train(server_round, replies)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"rounds": np.array(self.rounds)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.rounds = int(state["rounds"])


def flower_epsilon(config: RunConfig, releases: int) -> float:
    """Flower's RdpAccountant, recomputed here from the mechanism's parameters."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=config.target_delta,
            population_size=config.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    event = GaussianPrivacyEvent(config.noise_multiplier, config.sampled_clients(), config.num_clients)
    accountant.compose(event, count=releases)
    return accountant.get_epsilon(config.target_delta)
