"""Sampling depends on the seed and partition ids only, not on Flower's random node ids."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedsim import wire
from fedsim.strategy import ordering
from fedsim.strategy.ordering import ReproducibleStrategy


@pytest.fixture(autouse=True)
def plain_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Message needs a running app context; the roster only needs its addressee."""

    def message(content, dst_node_id, message_type):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst_node_id, message_type=message_type))

    monkeypatch.setattr(ordering, "Message", message)


class SamplingProbe:
    """Stands in for FedAvg: samples a quarter of the nodes exactly as Flower's strategies do."""

    def configure_train(self, server_round, arrays, config, grid):
        nodes, _ = sample_nodes(grid, min_available_nodes=20, sample_size=5)
        return nodes


class RosterGrid:
    """A deployment-like Grid: random node ids, partition ids only known by asking the nodes."""

    def __init__(self, partitions: int, seed: int) -> None:
        ids = random.Random(seed).sample(range(1, 2**62), partitions)
        self.partition_of = dict(zip(ids, range(partitions), strict=True))
        self.queries = 0

    def get_node_ids(self) -> set[int]:
        return set(self.partition_of)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.queries += 1
            node = msg.metadata.dst_node_id
            content = SimpleNamespace(
                config_records={wire.CLIENT: {wire.PARTITION_ID: self.partition_of[node]}}
            )
            replies.append(SimpleNamespace(has_error=lambda: False, content=content,
                                           metadata=SimpleNamespace(src_node_id=node)))  # fmt: skip
        return replies


def sampled_partitions(grid_seed: int, server_round: int) -> list[int]:
    grid = RosterGrid(20, grid_seed)
    strategy = ReproducibleStrategy(SamplingProbe(), seed=5, min_nodes=20, need_roster=True)
    nodes = strategy.configure_train(server_round, None, None, grid)
    assert grid.queries == 20, "one roster query per node"
    return sorted(grid.partition_of[node] for node in nodes)


def test_same_seed_samples_the_same_partitions_whatever_the_node_ids() -> None:
    first = [sampled_partitions(grid_seed=1, server_round=r) for r in (1, 2, 3)]
    again = [sampled_partitions(grid_seed=2, server_round=r) for r in (1, 2, 3)]
    assert first == again
    assert all(len(s) == 5 for s in first)
    assert len({tuple(s) for s in first}) > 1, "rounds should sample different clients"


def test_round_offset_continues_the_sampling_sequence() -> None:
    """A run resumed after round 2 samples round 3 as an uninterrupted run does."""
    grid = RosterGrid(20, 3)
    resumed = ReproducibleStrategy(SamplingProbe(), 5, 20, need_roster=True, round_offset=2)
    nodes = resumed.configure_train(1, None, None, grid)
    assert sorted(grid.partition_of[node] for node in nodes) == sampled_partitions(4, 3)
