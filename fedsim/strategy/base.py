"""The one base class of fedsim's strategy wrappers: delegation written once, state for resume.

Every wrapper (ordering, reply validation, auditing, central DP) holds the next strategy of the
chain in `inner` and overrides only the steps it changes, as Flower's own DP wrappers do. Wrapping
by composition, not subclassing, keeps Flower's DP accountant working (it rejects FedAvg
subclasses).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Delegates every step to `inner`; subclasses override what they add."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    # Resume: each wrapper saves and restores only its own state; the chain collects them.
    @property
    def state_prefix(self) -> str:
        """Where the chain files this wrapper's state in a checkpoint: `<prefix>/<key>`."""
        return type(self).__name__

    def state_dict(self) -> dict[str, np.ndarray]:
        """This wrapper's own state across rounds (empty when it has none)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned; wrappers without state accept only an empty dict."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but got {sorted(state)[:3]}")


class RoundStartWrapper(StrategyWrapper):
    """A wrapper that aggregates against the round's starting global model (the arrays
    `configure_train` sent): reply validation, completion of partial replies, the model's hook."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self._round_start: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = {name: array.numpy() for name, array in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def round_start(self, needed_for: str) -> dict[str, np.ndarray]:
        """The round's starting global model; RuntimeError naming `needed_for` before any round."""
        if self._round_start is None:
            raise RuntimeError(f"aggregate_train before configure_train: no global model {needed_for}")
        return self._round_start
