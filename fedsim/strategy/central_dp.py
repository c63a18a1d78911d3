"""Central differential privacy: Flower's DP wrappers around the aggregator, with its accountant.

fedsim does not re-implement DP-FedAvg. It builds one of Flower's four wrappers
(`DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`) directly around the plain
aggregator and holds it in a `CentralPrivacy` link that adds what a reproducible run needs:

- Flower's noise comes from numpy's global generator; it is seeded from (run seed, round) before
  each aggregation, so a run repeats and a resumed run matches a straight one;
- the accountant's state (Flower's own `state_dict`, JSON) and an adaptive clipping norm are
  saved with every checkpoint and restored on resume;
- client weights are made equal (a `dp-weight` of 1 per reply, which the aggregator weights by),
  as Flower's accountant requires and DP-FedAvg (McMahan et al. 2018) assumes: with
  example-count weights one client's influence, and so the sensitivity, would be unbounded.

Accounting (fixed clipping only): `RdpAccountant` over client-level neighbouring datasets (add
or remove one client), without amplification by sampling, as Flower's fixed-clipping wrappers
require; adaptive clipping has no accountant in Flower, and rows say so. Flower also requires the
plain FedAvg aggregation (FedAvg or FedProx here) and that every sampled client replies: a round
with a failed client (or, with the accountant, a rejected one) is skipped, costing no budget
(`skipped_rounds`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError
from fedsim.strategy.base import StrategyWrapper

log = logging.getLogger(__name__)

# Strategies whose aggregation is FedAvg's own (Flower's accountant checks exactly this).
PLAIN_FEDAVG = ("fedavg", "fedprox")
OFF = "off"


def check_central_dp(config: RunConfig) -> None:
    """Flower's constraints on central DP as one-line user errors, before anything runs."""
    if config.central_dp == OFF:
        return
    if config.strategy not in PLAIN_FEDAVG:
        raise UserInputError(
            f"central DP needs plain FedAvg aggregation (Flower's DP wrappers and accountant average "
            f"clipped updates), not {config.strategy}; pass --strategy fedavg or --central-dp off"
        )
    if config.noise_multiplier <= 0:
        raise UserInputError(
            "central DP with --noise-multiplier 0 adds no noise and its ε is infinite; "
            "pass --noise-multiplier above 0 (e.g. 1)"
        )
    sampled = config.sampled_clients()
    if config.adaptive_clipping and config.noise_multiplier >= sampled / 10:
        # Flower noises the clipped-update count with std sampled/20, which must exceed z/2.
        raise UserInputError(
            f"adaptive clipping with {sampled} clients per round cannot reach noise multiplier "
            f"{config.noise_multiplier:g} (Flower needs z < clients/10 = {sampled / 10:g}); "
            "lower --noise-multiplier or sample more clients"
        )


def central_dp_label(config: RunConfig) -> str:
    """How audit rows name central DP, with where it acts relative to the curious server's view:
    server-side clipping and all noise come after it (the server sees the raw update); with
    client-side clipping the update is clipped before the server sees it."""
    clipping = "adaptive" if config.adaptive_clipping else f"C={config.clipping_norm:g}"
    where = "after-view" if config.central_dp == "server" else "clipped-before-view"
    return f"central-dp({config.central_dp},z={config.noise_multiplier:g},{clipping}):{where}"


@dataclass(frozen=True)
class CentralSpend:
    """Central DP's budget after a round: client-level ε (None without an accountant)."""

    epsilon: float | None
    delta: float
    releases: int
    noise_multiplier: float  # on the aggregate's clipped updates (adaptive: Flower's adjusted z)
    clipping_norm: float  # the norm used this round
    sample_rate: float  # sampled / population (no amplification is assumed)


class CentralPrivacy(StrategyWrapper):
    """Holds Flower's DP wrapper (`inner`) around the aggregator; seeds, equalises weights,
    reports the spend and saves the accountant with each checkpoint."""

    state_prefix = "central-dp"

    def __init__(self, aggregator: Strategy, config: RunConfig) -> None:
        self.config = config
        self.sampled = config.sampled_clients()
        self.accountant: RdpAccountant | None = None
        super().__init__(self._wrap(aggregator))
        self.dp = self.inner
        self.skipped_rounds: list[int] = []
        self.last_spend: CentralSpend | None = None

    def _wrap(self, aggregator: Strategy) -> Strategy:
        config = self.config
        client_side = config.central_dp == "client"
        if config.adaptive_clipping:
            kind = (
                DifferentialPrivacyClientSideAdaptiveClipping
                if client_side
                else DifferentialPrivacyServerSideAdaptiveClipping
            )
            return kind(
                aggregator,
                noise_multiplier=config.noise_multiplier,
                num_sampled_clients=self.sampled,
                initial_clipping_norm=config.clipping_norm,
                target_clipped_quantile=config.target_quantile,
                clip_norm_lr=config.clip_norm_lr,
            )
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=config.target_delta,
                population_size=config.num_clients,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        fixed = (
            DifferentialPrivacyClientSideFixedClipping
            if client_side
            else DifferentialPrivacyServerSideFixedClipping
        )
        return fixed(
            aggregator,
            noise_multiplier=config.noise_multiplier,
            clipping_norm=config.clipping_norm,
            num_sampled_clients=self.sampled,
            accountant=self.accountant,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [_with_weight(reply) for reply in replies]
        failed = sum(reply.has_error() for reply in replies)
        usable = len(replies) - failed
        # Flower's wrappers skip a round with any failed client, and with the accountant also one
        # with fewer usable updates than sampled (validation may have rejected some).
        if failed or (self.accountant is not None and usable != self.sampled):
            self.skipped_rounds.append(server_round)
            log.warning(
                "round %d: central DP skips the round (%d of %d sampled clients usable, %d failed; Flower's "
                "DP wrappers need every one); the global model stays, no budget is spent",
                server_round, usable, self.sampled, failed,
            )  # fmt: skip
        clipping_norm = float(self.dp.clipping_norm)  # before an adaptive update
        np.random.seed(_noise_seed(self.config.seed, server_round))  # Flower draws from np.random
        arrays, metrics = self.dp.aggregate_train(server_round, replies)
        self.last_spend = self._spend(clipping_norm) if arrays is not None else None
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Evaluation is not private: its metrics keep their example weights."""
        return self.dp.aggregate_evaluate(server_round, [_with_weight(r, wire.NUM_EXAMPLES) for r in replies])

    def _spend(self, clipping_norm: float) -> CentralSpend:
        spent = self.accountant.get_privacy_spent() if self.accountant is not None else None
        return CentralSpend(
            epsilon=spent.epsilon if spent is not None else None,
            delta=self.config.target_delta,
            releases=spent.num_releases if spent is not None else 0,
            noise_multiplier=float(self.dp.noise_multiplier),
            clipping_norm=clipping_norm,
            sample_rate=self.sampled / self.config.num_clients,
        )

    def epsilon(self) -> float | None:
        """Client-level ε spent so far (None without an accountant)."""
        return self.accountant.get_privacy_spent().epsilon if self.accountant is not None else None

    # Resume: the accountant's own state (JSON bytes) and the adaptive clipping norm.
    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"clipping-norm": np.array([self.dp.clipping_norm], dtype=np.float64)}
        if self.accountant is not None:
            encoded = json.dumps(self.accountant.state_dict(), sort_keys=True).encode()
            state["accountant"] = np.frombuffer(encoded, dtype=np.uint8).copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"central DP state holds {sorted(state)}, expected {sorted(expected)}")
        self.dp.clipping_norm = float(state["clipping-norm"][0])
        if self.accountant is not None:
            self.accountant.load_state_dict(json.loads(state["accountant"].tobytes().decode()))


def state_shapes(config: RunConfig) -> dict[str, tuple[int, ...] | None]:
    """What `CentralPrivacy.state_dict` holds after a round; None: a length that varies."""
    if config.central_dp == OFF:
        return {}
    shapes: dict[str, tuple[int, ...] | None] = {"clipping-norm": (1,)}
    if not config.adaptive_clipping:
        shapes["accountant"] = None
    return {f"{CentralPrivacy.state_prefix}/{key}": shape for key, shape in shapes.items()}


def _with_weight(reply: Message, copy_of: str | None = None) -> Message:
    """The reply with `wire.DP_WEIGHT`, the aggregator's weighting key under central DP, set to
    1 (train: equal weights) or to the value of the metric `copy_of` (evaluate: example counts)."""
    if not reply.has_error() and wire.METRICS in reply.content.metric_records:
        metrics = reply.content.metric_records[wire.METRICS]
        metrics[wire.DP_WEIGHT] = 1 if copy_of is None else metrics.get(copy_of, 1)
    return reply


def _noise_seed(seed: int, server_round: int) -> int:
    return int(np.random.SeedSequence([seed, server_round, 0xD9]).generate_state(1)[0])
