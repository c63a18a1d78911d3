"""The server's strategy chain, built in one place, in one documented order (outermost first):

1. ordering (`ReproducibleStrategy`): absolute round numbers, sampling seeded per round over
   nodes in partition order, replies sorted by partition id and shown to the observers (the run
   store logs every reply, rejected ones included);
   completion (when the model family sends less than its federated model in some rounds,
   `fedsim.strategy.completion`): a reply of exactly `sent_names(round)` gets the round's global
   values of the entries it did not send, so validation sees whole models;
2. reply validation (`ValidatingStrategy`): drops non-finite, mis-shaped, mis-typed and
   norm-outlier updates before anyone else sees them, hands every unusable reply (rejected,
   failed, missing) to `on_faults` (`faults.csv`), and stops the run on a round with no usable
   update or a non-finite aggregate;
3. model hook (when the model family has one, `fedsim.strategy.model_hook`): rewrites the
   aggregate from the clients' validated extra records (ProtoPNet's push), frozen tensors reset;
4. privacy ledger (when DP-SGD or central DP spends budget): `privacy.csv`, each client's and
   central DP's ε (`fedsim.strategy.privacy_ledger`);
5. audit (optional, the factory given to `build_chain`): attacks the validated updates where an
   honest-but-curious server stands, before any central DP noise;
6. central DP (optional): Flower's DP wrapper directly around the aggregator, because its
   accountant needs the plain aggregator as its inner strategy (`fedsim.strategy.central_dp`);
7. aggregator: the configured Flower strategy (`fedsim.strategy.aggregators.build_strategy`).

For resume, each wrapper saves its own state under `<state_prefix>/`, and the aggregator's
server-optimiser moments go under `aggregator/` (`AggregatorState`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedsim.config.run_config import RunConfig
from fedsim.strategy import central_dp, privacy_ledger
from fedsim.strategy.aggregators import AggregatorState, build_strategy
from fedsim.strategy.base import StrategyWrapper
from fedsim.strategy.central_dp import CentralPrivacy
from fedsim.strategy.completion import ReplyCompletion, overrides_sent_names
from fedsim.strategy.model_hook import ModelRoundHook, overrides_after_aggregation
from fedsim.strategy.ordering import RepliesObserver, ReproducibleStrategy
from fedsim.strategy.privacy_ledger import PrivacyLedger
from fedsim.strategy.validation import FaultsObserver, ValidatingStrategy
from models import TrainingSettings, ZooModel

AuditFactory = Callable[[Strategy], Strategy]
AGGREGATOR = "aggregator"
S = TypeVar("S", bound=Strategy)


@dataclass(frozen=True)
class StrategyChain:
    """The built chain: `outer` is what the ServerApp starts; `aggregator` is the Flower
    strategy at the bottom."""

    outer: Strategy
    aggregator: Strategy

    def links(self) -> list[StrategyWrapper]:
        """fedsim's wrappers around the aggregator (each holds the next in `inner`), from the
        outside in; the walk ends at the first strategy that is not fedsim's (Flower's DP
        wrapper or the aggregator)."""
        links: list[StrategyWrapper] = []
        link = self.outer
        while isinstance(link, StrategyWrapper):
            links.append(link)
            link = link.inner
        return links

    def find(self, kind: type[S]) -> S | None:
        """The chain's wrapper of this kind, if any."""
        return next((link for link in self.links() if isinstance(link, kind)), None)

    def _parts(self) -> dict[str, StrategyWrapper | AggregatorState]:
        """The parts that keep state: every StrategyWrapper and the aggregator."""
        parts: dict[str, StrategyWrapper | AggregatorState] = {}
        for part in [*self.links(), AggregatorState(self.aggregator)]:
            prefix = part.state_prefix if isinstance(part, StrategyWrapper) else AGGREGATOR
            if prefix in parts or "/" in prefix:
                raise ValueError(f"two parts of the strategy chain would save state under {prefix!r}")
            parts[prefix] = part
        return parts

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every part's state, each under its own prefix: `<prefix>/<key>`."""
        return {
            f"{prefix}/{key}": value
            for prefix, part in self._parts().items()
            for key, value in part.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Hand each part its own keys; state for a part this chain lacks is an error."""
        parts = self._parts()
        grouped: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in parts}
        for key, value in state.items():
            prefix, _, rest = key.partition("/")
            if prefix not in grouped:
                raise ValueError(f"saved strategy state {key!r} belongs to no part of this chain")
            grouped[prefix][rest] = value
        for prefix, part in parts.items():
            part.load_state_dict(grouped[prefix])


def keeps_privacy_ledger(config: RunConfig) -> bool:
    """A ledger runs when a mechanism spends privacy budget: DP-SGD on clients or central DP."""
    return "dp-sgd" in config.transformation_names() or config.central_dp != central_dp.OFF


def checkpoint_state_shapes(
    config: RunConfig, array_shapes: Mapping[str, tuple[int, ...]], server_round: int
) -> dict[str, tuple[int, ...] | None]:
    """What the checkpoint of this config's chain holds after `server_round`, key by key, so
    resume can check a strategy file before anything runs: central DP's state and the privacy
    ledger's from round 0 on (None: an array whose length grows with the rounds), the
    aggregator's moments once it has aggregated (round 1 on)."""
    shapes: dict[str, tuple[int, ...] | None] = dict(central_dp.state_shapes(config))
    if keeps_privacy_ledger(config):
        shapes |= privacy_ledger.state_shapes()
    if server_round >= 1:
        moments = AggregatorState(build_strategy(config)).state_shapes(array_shapes)
        shapes |= {f"{AGGREGATOR}/{k}": v for k, v in moments.items()}
    return shapes


def build_chain(
    config: RunConfig,
    *,
    round_offset: int = 0,
    on_train: Iterable[RepliesObserver] = (),
    on_evaluate: Iterable[RepliesObserver] = (),
    on_faults: FaultsObserver | None = None,
    audit: AuditFactory | None = None,
    model_dtypes: Mapping[str, np.dtype] | None = None,
    output_dir: Path | None = None,
    model: ZooModel | None = None,
    settings: TrainingSettings | None = None,
) -> StrategyChain:
    """The chain for a validated config, in the order of the module docstring.

    `round_offset`: rounds already done (resume); `on_train`/`on_evaluate`: observers of every
    round's replies; `on_faults`: gets each round's unusable replies (see validation); `audit`:
    wraps its inner strategy in the auditor, required when `config.audit` is set; `model_dtypes`:
    each array's dtype in the clients' model, which replies must match exactly; `output_dir`: where
    the privacy ledger writes `privacy.csv` (required when the config spends privacy budget);
    `model`: the run's model, whose `after_aggregation` hook (if the family has one) runs on each
    aggregate with `settings`, and whose `sent_names` (if the family sends partial replies) says
    which replies to complete (`settings` become its `run_settings` when it has none).
    """
    aggregator = build_strategy(config)
    strategy: Strategy = aggregator
    central = None
    if config.central_dp != central_dp.OFF:
        strategy = central = CentralPrivacy(aggregator, config)
    if config.audit:
        if audit is None:
            raise ValueError("config.audit is set but no audit wrapper was given to build_chain")
        strategy = audit(strategy)
    if keeps_privacy_ledger(config):
        if output_dir is None:
            raise ValueError(
                "the config spends privacy budget but build_chain got no output_dir for its ledger"
            )
        strategy = PrivacyLedger(strategy, output_dir, config.target_delta, central)
    if model is not None and overrides_after_aggregation(model):
        if settings is None:
            raise ValueError("build_chain got a model with a server-side hook but no training settings")
        strategy = ModelRoundHook(strategy, model, settings)
    strategy = ValidatingStrategy(strategy, config.reject_norm_ratio, model_dtypes, on_faults)
    if model is not None and overrides_sent_names(model):
        if model.run_settings is None:  # its sent_names reads the run's length
            if settings is None:
                raise ValueError(
                    "build_chain got a model that sends partial replies but no training settings"
                )
            model.run_settings = settings
        strategy = ReplyCompletion(strategy, model, model_dtypes or {})
    strategy = ReproducibleStrategy(
        strategy,
        seed=config.seed,
        min_nodes=config.num_clients,
        need_roster=config.fraction_train < 1 or 0 < config.fraction_evaluate < 1,
        round_offset=round_offset,
        on_train=on_train,
        on_evaluate=on_evaluate,
    )
    return StrategyChain(strategy, aggregator)
