"""Real Flower Messages outside a running app, for tests of what client and server exchange.

Flower stamps instruction messages with the sending task's identity, which only a running app
sets; `act_as_server(monkeypatch)` sets it for the duration of a test.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.strategy.aggregators import build_strategy
from fedsim.training.local import model_for


def act_as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class StaticGrid:
    """A Grid whose nodes are all connected already: what strategies' sampling needs."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in values.items()})


def train_reply(
    partition_id: int,
    weights: dict[str, np.ndarray] | None,
    num_examples: float = 10,
    metrics: dict[str, float] | None = None,
) -> Message:
    """A client's train reply as fedsim's ClientApp shapes it (None: no ArrayRecord)."""
    instruction = Message(RecordDict(), dst_node_id=100 + partition_id, message_type="train")
    content = RecordDict(
        {
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples, **(metrics or {})}),
            wire.CLIENT: ConfigRecord({wire.PARTITION_ID: partition_id}),
        }
    )
    if weights is not None:
        content[wire.ARRAYS] = arrays(weights)
    return Message(content, reply_to=instruction)


def train_messages(config: RunConfig) -> list[Message]:
    """The train messages the configured strategy itself builds for round 1."""
    strategy = build_strategy(config)
    initial = ArrayRecord(model_for(config).state_dict())
    grid = StaticGrid(list(range(101, 101 + config.num_clients)))
    return list(strategy.configure_train(1, initial, wire.run_config_record(config), grid))
