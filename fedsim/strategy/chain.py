"""The server's strategy chain, built in one place, in one documented order (outermost first):

1. ordering (`ReproducibleStrategy`): absolute round numbers, sampling seeded per round over
   nodes in partition order, replies sorted by partition id and shown to the observers (the run
   store logs every reply, rejected ones included);
2. reply validation (`ValidatingStrategy`): drops non-finite, mis-shaped, mis-typed and (if
   configured) norm-outlier updates before anyone else sees them, and stops the run on a round
   with no usable update or a non-finite aggregate;
3. audit (optional, the factory given to `build_chain`): attacks the validated updates where an
   honest-but-curious server stands, before any central DP noise;
4. central DP (next issue): clipping and noise go here, directly around the aggregator, because
   Flower's DP wrappers and their accountant need the plain aggregator as their inner strategy;
5. aggregator: the configured Flower strategy (`fedsim.strategy.aggregators.build_strategy`).

For resume, each wrapper saves its own state under `<state_prefix>/`, and the aggregator's
server-optimiser moments go under `aggregator/` (`AggregatorState`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedsim.config.run_config import RunConfig
from fedsim.strategy.aggregators import AggregatorState, build_strategy
from fedsim.strategy.base import StrategyWrapper
from fedsim.strategy.ordering import RepliesObserver, ReproducibleStrategy
from fedsim.strategy.validation import ValidatingStrategy

AuditFactory = Callable[[Strategy], Strategy]
AGGREGATOR = "aggregator"
S = TypeVar("S", bound=Strategy)


@dataclass(frozen=True)
class StrategyChain:
    """The built chain: `outer` is what the ServerApp starts; `aggregator` is the Flower
    strategy at the bottom."""

    outer: Strategy
    aggregator: Strategy

    def links(self) -> list[Strategy]:
        """The strategies wrapped around the aggregator (each holds the next in `inner`),
        from the outside in."""
        links: list[Strategy] = []
        link = self.outer
        while link is not self.aggregator:
            links.append(link)
            link = link.inner  # type: ignore[attr-defined]
        return links

    def find(self, kind: type[S]) -> S | None:
        """The chain's wrapper of this kind, if any."""
        return next((link for link in self.links() if isinstance(link, kind)), None)

    def _parts(self) -> dict[str, StrategyWrapper | AggregatorState]:
        """The parts that keep state: every StrategyWrapper and the aggregator."""
        wrappers = [link for link in self.links() if isinstance(link, StrategyWrapper)]
        parts: dict[str, StrategyWrapper | AggregatorState] = {}
        for part in [*wrappers, AggregatorState(self.aggregator)]:
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


def state_shapes_after_a_round(
    config: RunConfig, array_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """What a checkpoint of this config's chain holds after round 1, key by key, so resume can
    check a strategy file before anything runs: the aggregator's moments (the wrappers keep none)."""
    moments = AggregatorState(build_strategy(config)).state_shapes(array_shapes)
    return {f"{AGGREGATOR}/{key}": shape for key, shape in moments.items()}


def build_chain(
    config: RunConfig,
    *,
    round_offset: int = 0,
    on_train: Iterable[RepliesObserver] = (),
    on_evaluate: Iterable[RepliesObserver] = (),
    audit: AuditFactory | None = None,
    model_dtypes: Mapping[str, np.dtype] | None = None,
) -> StrategyChain:
    """The chain for a validated config, in the order of the module docstring.

    `round_offset`: rounds already done (resume); `on_train`/`on_evaluate`: observers of every
    round's replies; `audit`: wraps its inner strategy in the auditor, required when
    `config.audit` is set; `model_dtypes`: each array's dtype in the clients' model, which
    replies must match exactly.
    """
    aggregator = build_strategy(config)
    strategy: Strategy = aggregator
    # (4. central DP: the next issue wraps `strategy` here, directly around the aggregator.)
    if config.audit:
        if audit is None:
            raise ValueError("config.audit is set but no audit wrapper was given to build_chain")
        strategy = audit(strategy)
    strategy = ValidatingStrategy(strategy, config.reject_norm_ratio, model_dtypes)
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
