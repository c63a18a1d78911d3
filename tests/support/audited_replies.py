"""A digits MLP, its one-step replies as a server receives them, and a recorder of audit rows."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from attacks.base import observe_gradient
from fedsim import wire
from fedsim.data.photos import photo_crops
from fedsim.training.client_step import ClientTraining
from models import InputSpec, ZooModel, build_model

SHAPE = (3, 8, 8)


LR = 0.1
PLAIN_SGD = ClientTraining.plain_sgd(LR)  # what the replies below were trained with


class Recorder(Strategy):
    """The next strategy of the chain: records what reached aggregation."""

    def __init__(self) -> None:
        self.aggregated: list[list[Message]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, None]:
        self.aggregated.append(list(replies))
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    def summary(self) -> None:
        return None


def digits_mlp() -> ZooModel:
    torch.manual_seed(0)
    return build_model("mlp", InputSpec(SHAPE, 10))


def train_reply_of(
    partition_id: int,
    sample: int,
    truth: bool = True,
    num_examples: int = 1,
    poison: float | None = None,
    truth_samples: int = 1,
    local_steps: int = 1,
) -> Message:
    """What a FedSGD batch-1 client sends back: w - lr * g for one photo crop (reporting
    `local_steps` steps: what the server reads its gradient estimate with)."""
    model = digits_mlp()
    x, y = photo_crops(sample + truth_samples, size=SHAPE[1], seed=2)
    x, y = x[sample:], y[sample:]
    grads = observe_gradient(model, torch.from_numpy(x[:1]), torch.from_numpy(y[:1])).gradients
    local = {name: param.detach() - LR * grads[name] for name, param in model.named_parameters()}
    if poison is not None:
        local["layers.1.weight"][0, 0] = poison
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(local),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples, wire.LOCAL_STEPS: local_steps}),
            wire.CLIENT: ConfigRecord({wire.PARTITION_ID: partition_id}),
        }
    )
    if truth:
        content[wire.AUDIT_TRUTH] = wire.encode_truth(x, y)
    metadata = Metadata(
        run_id=1, message_id=f"reply-{partition_id}", src_node_id=partition_id + 1, dst_node_id=0,
        reply_to_message_id="train", group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip
    return Message(content, metadata=metadata)
