"""What a node holds, read from its node config (`flower-supernode --node-config "..."`).

Flower's simulation sets `partition-id` and `num-partitions` on every virtual node. A deployed
SuperNode sets them itself, and may instead point `data-path` at a local `.npz` of its own samples.
A node that says nothing must fail loudly: silently training on partition 0 would let every
node of a deployment train on the same slice. Every bad value is one `UserInputError` line that
names the key to set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import ClientData, client_data, node_file_data
from fedsim.errors import UserInputError

NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
NODE_CONFIG_FLAG = 'flower-supernode --node-config "partition-id=0 num-partitions=2"'


@dataclass(frozen=True)
class NodeData:
    """This node's identity and data source.

    `partition_id` names the node in audit rows, orders it for seeded sampling and seeds its local
    shuffle, so it is required even with `data_path`. `num_partitions` is None when the node
    leaves it to the run (`clients`). `data_path` is a local `.npz` (x, y) used instead of a slice
    of the run's dataset."""

    partition_id: int
    num_partitions: int | None = None
    data_path: Path | None = None


def _integer(node_config: Mapping[str, Any], key: str, example: int) -> int | None:
    value = node_config.get(key)
    if value is None:
        return None
    not_integer = UserInputError(f"node config {key}={value!r} is not an integer; set e.g. {key}={example}")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise not_integer
    try:
        number = int(value)
    except ValueError:
        raise not_integer from None
    if number < 0:
        raise UserInputError(f"node config {key}={number} is negative; set a value of 0 or more")
    return number


def partition_id_of(node_config: Mapping[str, Any]) -> int:
    """The node's `partition-id`; a node without one is refused, never given partition 0."""
    partition_id = _integer(node_config, wire.PARTITION_ID, 0)
    if partition_id is None:
        raise UserInputError(
            f"this node has no {wire.PARTITION_ID} in its node config; start it with "
            f"{NODE_CONFIG_FLAG} (and data-path=... to train on a local .npz)"
        )
    return partition_id


def read_node_config(node_config: Mapping[str, Any]) -> NodeData:
    """Parse and check the node's own keys (those that need no run config)."""
    partition_id = partition_id_of(node_config)
    num_partitions = _integer(node_config, NUM_PARTITIONS, 2)
    if num_partitions is not None:
        if num_partitions < 1:
            raise UserInputError(
                f"node config {NUM_PARTITIONS}=0; set the federation's client count (1 or more)"
            )
        if partition_id >= num_partitions:
            raise UserInputError(
                f"node config {wire.PARTITION_ID}={partition_id} is not below {NUM_PARTITIONS}="
                f"{num_partitions}; partition ids run 0 .. {num_partitions - 1}"
            )
    data_path = node_config.get(DATA_PATH)
    path = None
    if data_path is not None:
        if not isinstance(data_path, str) or not data_path.strip():
            raise UserInputError(
                f"node config {DATA_PATH}={data_path!r} is not a file path; "
                f'quote it: {DATA_PATH}="/data/node.npz"'
            )
        path = Path(data_path).expanduser()
        if path.suffix != ".npz":
            raise UserInputError(
                f"node config {DATA_PATH}={data_path!r} must name a .npz file holding arrays x and y"
            )
        if not path.is_file():
            raise UserInputError(f"node config {DATA_PATH}={data_path!r}: no such file on this node")
    return NodeData(partition_id, num_partitions, path)


def node_data_for_run(node_config: Mapping[str, Any], config: RunConfig) -> NodeData:
    """The node's config checked against the run the server sent: the node must agree with the
    run on how many partitions there are, and hold one of them."""
    node = read_node_config(node_config)
    if node.num_partitions is not None and node.num_partitions != config.num_clients:
        raise UserInputError(
            f"node config {NUM_PARTITIONS}={node.num_partitions} but the run has "
            f"clients={config.num_clients}; start the node with {NUM_PARTITIONS}={config.num_clients} "
            f"or run with -c clients={node.num_partitions}"
        )
    if node.partition_id >= config.num_clients:
        raise UserInputError(
            f"node config {wire.PARTITION_ID}={node.partition_id} but the run has "
            f"clients={config.num_clients}; partition ids run 0 .. {config.num_clients - 1}"
        )
    return node


def load_node_data(node_config: Mapping[str, Any], config: RunConfig) -> tuple[int, ClientData]:
    """This node's partition id and samples for the run: its own `data-path` file, or its slice
    of the run's dataset (only that slice's arrays are built)."""
    node = node_data_for_run(node_config, config)
    if node.data_path is not None:
        return node.partition_id, node_file_data(config, node.partition_id, node.data_path)
    return node.partition_id, client_data(config, node.partition_id)
