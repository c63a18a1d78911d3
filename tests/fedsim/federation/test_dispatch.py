"""Sampling and dispatch at load: 10,000 simulated nodes are put in partition order from their registration
times, without the roster query (one message per node, minutes at this size), and the nodes a
round trains are a reproducible function of (seed, round) over the whole population; the
simulation hands messages to its workers by asking only the nodes that have one waiting.

The memory side of load (flat RSS across rounds at 1,000 and 10,000 clients) is measured by
benchmarks/performance/load.py: a federation's cold start alone exceeds a test's budget on 2 shared cores.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from queue import Queue
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.federation import dispatch
from fedsim.strategy.chain import build_chain
from fedsim.strategy.ordering import PartitionOrderedGrid
from tests.support.flower_messages import act_as_server, arrays

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


class StoredMessages:
    """The parts of Flower's InMemoryLinkState the sweep reads, counting how often nodes are asked."""

    def __init__(self, pending: dict[str, tuple[int, str]]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            message_id: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=at))
            for message_id, (node, at) in pending.items()
        }
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list[SimpleNamespace]:
        self.asked.append(node_id)
        found = [
            m for m in self.message_ins_store.values()
            if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""
        ][:limit]  # fmt: skip
        for message in found:
            message.metadata.delivered_at = "now"
        return found


def test_the_sweep_asks_only_nodes_with_undelivered_messages_in_partition_order() -> None:
    nodes = {node_id: partition for partition, node_id in enumerate(SimulatedGrid().node_ids)}
    by_partition = list(nodes)
    state = StoredMessages(
        {
            "a": (by_partition[9_000], ""),
            "b": (by_partition[3], ""),
            "c": (by_partition[3], ""),  # a second message waits for the next sweep, as in Flower
            "d": (by_partition[5_000], "2026-01-01T00:00:00"),  # delivered: its node is not asked
        }
    )
    queue: Queue = Queue()
    stop = threading.Event()
    sweeper = threading.Thread(target=dispatch.add_messages_to_queue, args=(state, queue, nodes, stop))
    sweeper.start()
    deadline = time.monotonic() + 10
    while queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    sweeper.join()
    assert queue.qsize() == 3
    assert state.asked[:2] == [by_partition[3], by_partition[9_000]]  # partition order
    assert set(state.asked) == {by_partition[3], by_partition[9_000]}  # 2 of 10,000 nodes asked


def test_other_link_states_keep_flowers_sweep_over_every_node() -> None:
    nodes = {10: 0, 11: 1, 12: 2}
    assert list(dispatch.nodes_with_undelivered_messages(object(), nodes)) == [10, 11, 12]


def test_the_simulation_uses_the_sweep() -> None:
    try:
        dispatch.install()
        assert vce_api.add_messages_to_queue is dispatch.add_messages_to_queue
    finally:
        dispatch.uninstall()
    assert vce_api.add_messages_to_queue is not dispatch.add_messages_to_queue
