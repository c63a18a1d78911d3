"""Build the configured aggregation strategy from Flower's `flwr.serverapp.strategy`, and read
and write the state it carries across rounds (for resume)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from fedsim import wire
from fedsim.config.run_config import STRATEGIES, RunConfig
from fedsim.errors import UserInputError


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
    ratio = config.reject_norm_ratio
    if not (ratio == 0 or 1 < ratio < math.inf):
        # At 1 or below, every update at or above the median is rejected, honest or not.
        raise UserInputError(
            f"reject-norm-ratio must be 0 (off) or above 1, a multiple of the round's median update "
            f"norm (got {config.reject_norm_ratio}); pass e.g. 10"
        )


def build_strategy(config: RunConfig) -> Strategy:
    """The inner strategy (config checked by `validate_plan`); every node must be up before
    round 1 so sampling sees all of them. fedsim's record names are passed explicitly, so
    client and strategy agree on them by construction, not by matching defaults."""
    common: dict[str, Any] = {
        "arrayrecord_key": wire.ARRAYS,
        "configrecord_key": wire.CONFIG,
        # Central DP weights clients equally (see fedsim.strategy.central_dp).
        "weighted_by_key": wire.NUM_EXAMPLES if config.central_dp == "off" else wire.DP_WEIGHT,
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
        # eta_l is only logged by Flower's FedOpt (flwr/serverapp/strategy/fedopt.py), never computed with.
        return FedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate, **common)
    if config.strategy == "krum":
        return Krum(num_malicious_nodes=config.num_malicious, **common)
    if config.strategy == "fedmedian":
        return FedMedian(**common)
    if config.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=config.trim_beta, **common)
    raise UserInputError(f"unknown strategy {config.strategy!r}; choose one of: {', '.join(STRATEGIES)}")


class AggregatorState:
    """Adapter that reads and writes what a Flower aggregator carries across rounds: the
    server-optimiser moments `m_t`, `v_t` of the FedOpt family (FedAdam). The aggregator itself
    stays a plain Flower strategy, as Flower's DP wrappers and their accountant require.

    Keys are `<moment>/<array name>`; the strategy chain files them under `aggregator/`.
    """

    MOMENTS = ("m_t", "v_t")

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def _moments(self) -> tuple[str, ...]:
        return tuple(m for m in self.MOMENTS if hasattr(self.strategy, m))

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for moment in self._moments():
            for name, array in (getattr(self.strategy, moment) or {}).items():
                state[f"{moment}/{name}"] = np.asarray(array)
        return state

    def state_shapes(self, array_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """What `state_dict` holds once a round has been aggregated: one moment per model array."""
        return {
            f"{moment}/{name}": shape for moment in self._moments() for name, shape in array_shapes.items()
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the moments; a key this aggregator does not keep is an error, not ignored."""
        moments = self._moments()
        unknown = sorted(k for k in state if k.partition("/")[0] not in moments)
        if unknown:
            raise ValueError(f"{type(self.strategy).__name__} keeps no state {unknown[:3]}")
        for moment in moments:
            prefix = f"{moment}/"
            values = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if values:
                setattr(self.strategy, moment, values)
