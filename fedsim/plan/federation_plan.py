"""What a ServerApp is given: a validated config bound to its run store."""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.config.run_config import RunConfig
from fedsim.store.run_store import RunStore


@dataclass
class FederationPlan:
    """A validated config bound to its run store, and how far this invocation should go."""

    config: RunConfig
    store: RunStore
    stop_after: int | None = None

    def last_round(self) -> int:
        return min(self.config.rounds, self.stop_after or self.config.rounds)
