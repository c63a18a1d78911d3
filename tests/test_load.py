"""Sampling at load: 10,000 simulated nodes are put in partition order from their registration
times, without the roster query (one message per node, minutes at this size), and the nodes a
round trains are a reproducible function of (seed, round) over the whole population.

The memory side of load (flat RSS across rounds at 1,000 and 10,000 clients) is measured by
benchmarks/load.py: a federation's cold start alone exceeds a test's budget on 2 shared cores.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedsim.config.run_config import RunConfig
from fedsim.federation import wire
from fedsim.strategy.chain import build_chain
from fedsim.strategy.ordering import PartitionOrderedGrid
from tests.flower_messages import act_as_server, arrays

NODES = 10_000


class SimulatedGrid(InMemoryGrid):
    """The simulation's Grid as the server sees it: NODES nodes with random ids, registered in
    partition order (Flower's `_register_nodes`); asking the nodes anything fails the test."""

    def __init__(self, nodes: int = NODES, ties: bool = False) -> None:  # no LinkState: what sampling reads
        rng = np.random.default_rng(7)
        self.node_ids = [int(i) for i in rng.choice(2**62, size=nodes, replace=False)]
        start = datetime(2026, 1, 1, tzinfo=UTC)
        step = 0 if ties else 37  # microseconds between registrations
        self.registered = {
            node_id: (start + timedelta(microseconds=step * partition)).isoformat()
            for partition, node_id in enumerate(self.node_ids)
        }
        self.roster_queries = 0

    def get_node_ids(self) -> list[int]:
        return list(reversed(self.node_ids))  # any order but the partitions'

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=n, registered_at=t) for n, t in self.registered.items()]

    def send_and_receive(self, messages, *, timeout=None):
        self.roster_queries += 1
        raise AssertionError("the server queried every node for its partition id")


def test_ten_thousand_nodes_are_ordered_by_registration_without_a_roster_query() -> None:
    grid = SimulatedGrid()
    start = time.perf_counter()
    ordered = PartitionOrderedGrid(grid, min_nodes=NODES, need_roster=True).get_node_ids()
    assert ordered == grid.node_ids  # node i holds partition i
    assert grid.roster_queries == 0
    assert time.perf_counter() - start < 5.0  # a roster query at this size takes minutes


def test_tied_registration_times_fall_back_to_asking_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)  # the roster query builds real messages
    grid = SimulatedGrid(nodes=100, ties=True)
    with pytest.raises(AssertionError, match="queried every node"):
        PartitionOrderedGrid(grid, min_nodes=100, need_roster=True).get_node_ids()
    assert grid.roster_queries == 1


def _sampled(config: RunConfig, server_round: int) -> list[int]:
    """Partition ids the chain asks to train in `server_round`, on a fresh SimulatedGrid."""
    grid = SimulatedGrid()
    partition = {node_id: index for index, node_id in enumerate(grid.node_ids)}
    chain = build_chain(config)
    messages = chain.outer.configure_train(
        server_round, arrays({"w": np.zeros(2, np.float32)}), wire.run_config_record(config), grid
    )
    return sorted(partition[m.metadata.dst_node_id] for m in messages)


def test_one_percent_of_ten_thousand_nodes_is_sampled_reproducibly(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)
    config = RunConfig(num_clients=NODES, fraction_train=0.01, fraction_evaluate=0.001, seed=3)
    first = _sampled(config, 1)
    random.seed(99)  # whatever the global RNG's state before the round
    assert _sampled(config, 1) == first
    assert len(first) == len(set(first)) == 100
    second = _sampled(config, 2)
    assert second != first and len(second) == 100
    assert _sampled(config.replace(seed=4), 1) != first
    # drawn from the whole population, not from the first nodes registered
    assert max(first + second) > NODES // 2 and min(first + second) < NODES // 2
