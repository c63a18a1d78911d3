"""Build the configured aggregation strategy from Flower's `flwr.serverapp.strategy`."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from fedsim.config.run_config import STRATEGIES, RunConfig
from fedsim.errors import UserInputError
from fedsim.federation import wire


def check_strategy(config: RunConfig) -> None:
    """Strategy-specific limits, as one-line user errors before anything starts."""
    sampled = config.sampled_clients()
    if config.strategy == "krum" and sampled <= 2 * config.num_malicious + 2:
        raise UserInputError(
            f"Krum with {config.num_malicious} malicious clients needs more than "
            f"{2 * config.num_malicious + 2} clients per round (got {sampled}); "
            "add clients or raise fraction-train"
        )
    if config.strategy == "fedtrimmedavg" and not 0 <= config.trim_beta < 0.5:
        raise UserInputError(f"trim-beta must be in [0, 0.5) (got {config.trim_beta}); pass e.g. 0.2")
    if config.strategy == "fedprox" and config.proximal_mu < 0:
        raise UserInputError(f"proximal-mu must be >= 0 (got {config.proximal_mu}); pass e.g. 0.01")


def build_strategy(config: RunConfig) -> Strategy:
    """The inner strategy (config checked by `validate_plan`); every node must be up before
    round 1 so sampling sees all of them. fedsim's record names are passed explicitly, so
    client and strategy agree on them by construction, not by matching defaults."""
    common: dict[str, Any] = {
        "arrayrecord_key": wire.ARRAYS,
        "configrecord_key": wire.CONFIG,
        "weighted_by_key": wire.NUM_EXAMPLES,
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.num_clients,
    }
    if config.strategy == "fedavg":
        return FedAvg(**common)
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return FedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate, **common)
    if config.strategy == "krum":
        return Krum(num_malicious_nodes=config.num_malicious, **common)
    if config.strategy == "fedmedian":
        return FedMedian(**common)
    if config.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=config.trim_beta, **common)
    raise UserInputError(f"unknown strategy {config.strategy!r}; choose one of: {', '.join(STRATEGIES)}")


# Server-optimiser moments of the FedOpt family (FedAdam): needed to resume a run exactly.
_STATEFUL_ATTRIBUTES = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Flat `{"m_t/<array>": ndarray}` of whatever state the strategy carries across rounds."""
    state: dict[str, np.ndarray] = {}
    for attribute in _STATEFUL_ATTRIBUTES:
        for name, array in (getattr(strategy, attribute, None) or {}).items():
            state[f"{attribute}/{name}"] = np.asarray(array)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    for attribute in _STATEFUL_ATTRIBUTES:
        prefix = f"{attribute}/"
        values = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if values:
            setattr(strategy, attribute, values)
