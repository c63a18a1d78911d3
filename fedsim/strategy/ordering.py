"""A strategy wrapper that makes Flower rounds reproducible and observable.

Flower samples nodes with the global `random` over node ids that are random per run, and
aggregates replies in arrival order, so two runs with one seed differ. This wrapper (by
composition, so DP wrappers and their accountant keep working inside it):
- orders nodes by partition id and reseeds sampling from (seed, round),
- sorts replies by partition id before aggregation,
- numbers rounds absolutely (a resumed run continues at round k+1, also for FedAdam's bias
  correction), and
- hands each round's replies to observers (the run store, the auditor).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation's Grid

from fedsim import wire
from fedsim.strategy.base import StrategyWrapper

RepliesObserver = Callable[[int, list[Message]], None]


def partition_of(reply: Message) -> int:
    """The partition id a client put in its side record (errors sort last)."""
    if reply.has_error() or wire.CLIENT not in reply.content.config_records:
        return 1 << 62
    return int(reply.content.config_records[wire.CLIENT][wire.PARTITION_ID])


class PartitionOrderedGrid:
    """A Grid view whose node list is ordered by partition id (learnt once by a roster query)."""

    def __init__(self, grid: Grid, min_nodes: int, need_roster: bool, wait_seconds: float = 600.0) -> None:
        self._grid = grid
        self._min_nodes = min_nodes
        self._need_roster = need_roster
        self._wait_seconds = wait_seconds
        self._order: dict[int, int] | None = None

    def get_node_ids(self) -> list[int]:
        """All nodes, in partition order; waits for every node, since strategies size samples from it."""
        deadline = time.monotonic() + self._wait_seconds
        while (
            len(node_ids := list(self._grid.get_node_ids())) < self._min_nodes and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        if not self._need_roster:
            return sorted(node_ids)  # every node is asked; replies are ordered later
        if self._order is None or set(self._order) != set(node_ids):
            self._order = self._registration_order(node_ids) or self._roster(node_ids)
        return sorted(node_ids, key=self._order.__getitem__)

    def partitions(self) -> dict[int, int]:
        """node id → partition id as far as known (for naming clients that never replied):
        the roster, else the simulation's registration order, else nothing."""
        if self._order is None and self._in_memory():
            self._order = self._registration_order(list(self._grid.get_node_ids()))
        return {node: rank for node, rank in (self._order or {}).items() if rank != 1 << 62}

    def _registration_order(self, node_ids: list[int]) -> dict[int, int] | None:
        """In simulation, nodes register in partition order (`_register_nodes` creates node i
        for partition i), so registration times give the order without a message per node:
        a 10,000-node roster query costs minutes. None (ask the nodes) on a real deployment,
        where registration order means nothing, or if two times tie."""
        if not self._in_memory():
            return None
        registered = {info.node_id: info.registered_at for info in self._grid.get_nodes()}
        if set(registered) != set(node_ids) or not all(registered.values()):
            return None
        stamps = {node_id: datetime.fromisoformat(stamp) for node_id, stamp in registered.items()}
        if len(set(stamps.values())) != len(stamps):
            return None
        return {node_id: rank for rank, node_id in enumerate(sorted(stamps, key=stamps.__getitem__))}

    def _in_memory(self) -> bool:
        """The simulation's grid, maybe behind a view that delegates to it (`wrapped`)."""
        return isinstance(getattr(self._grid, "wrapped", self._grid), InMemoryGrid)

    def _roster(self, node_ids: list[int]) -> dict[int, int]:
        queries = [
            Message(RecordDict(), dst_node_id=node_id, message_type=wire.ROSTER_QUERY) for node_id in node_ids
        ]
        replies = self._grid.send_and_receive(queries)
        order = {node_id: 1 << 62 for node_id in node_ids}
        for reply in replies:
            order[reply.metadata.src_node_id] = partition_of(reply)
        return order

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class ReproducibleStrategy(StrategyWrapper):
    """Wraps any Flower strategy; see the module docstring for what it adds. Its state is
    `round_offset`, which resume derives from the checkpoint, so it saves none."""

    def __init__(
        self,
        inner: Strategy,
        seed: int,
        min_nodes: int,
        need_roster: bool = False,
        round_offset: int = 0,
        on_train: Iterable[RepliesObserver] = (),
        on_evaluate: Iterable[RepliesObserver] = (),
    ) -> None:
        super().__init__(inner)
        self.seed = seed
        self.min_nodes = min_nodes
        self.need_roster = need_roster
        self.round_offset = round_offset
        self.on_train = list(on_train)
        self.on_evaluate = list(on_evaluate)
        self._grid: PartitionOrderedGrid | None = None

    def _ordered_and_ready(self, grid: Grid) -> PartitionOrderedGrid:
        """The ordered view, its roster already fetched: a roster query draws from `random`
        (message ids), so it must happen before sampling is seeded, not between."""
        if self._grid is None or self._grid._grid is not grid:
            self._grid = PartitionOrderedGrid(grid, self.min_nodes, self.need_roster)
        self._grid.get_node_ids()
        return self._grid

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        ordered = self._ordered_and_ready(grid)
        random.seed(f"{self.seed}:{absolute}:train")
        return self.inner.configure_train(absolute, arrays, config, ordered)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.round_offset
        ordered = sorted(replies, key=partition_of)
        for observer in self.on_train:
            observer(absolute, ordered)
        return self.inner.aggregate_train(absolute, ordered)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        ordered = self._ordered_and_ready(grid)
        random.seed(f"{self.seed}:{absolute}:evaluate")
        return self.inner.configure_evaluate(absolute, arrays, config, ordered)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        absolute = server_round + self.round_offset
        ordered = sorted(replies, key=partition_of)
        for observer in self.on_evaluate:
            observer(absolute, ordered)
        return self.inner.aggregate_evaluate(absolute, ordered)
