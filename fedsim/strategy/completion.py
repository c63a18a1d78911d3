"""Partial replies made whole: a family that freezes groups by round sends back only what it
trained (`ZooModel.sent_names(round)`), and the server fills the other federated entries from the
round's global model before anyone else sees the reply.

It sits between the ordering wrapper and reply validation (see `fedsim.strategy.chain`). A reply
whose arrays are named exactly `sent_names(round)` is completed, in the global model's order,
with the global values cast to the client model's dtypes (what the client would have sent for a
tensor it did not train); any other reply passes unchanged, so validation still rejects a key set
that is neither the sent one nor the whole federated model. Stateless: a function of the round
and its global model, so resumes repeat exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedsim import wire
from fedsim.strategy.base import RoundStartWrapper
from models import ZooModel


def overrides_sent_names(model: ZooModel) -> bool:
    """Whether the family sends less than its federated model in some rounds (the chain skips
    this wrapper otherwise)."""
    return type(model).sent_names is not ZooModel.sent_names


class ReplyCompletion(RoundStartWrapper):
    """Completes each reply of exactly `model.sent_names(round)` with the round's global values
    of the entries not sent; everything else is delegated."""

    def __init__(self, inner: Strategy, model: ZooModel, model_dtypes: Mapping[str, np.dtype]) -> None:
        super().__init__(inner)
        self.model = model
        self.model_dtypes = dict(model_dtypes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        start = self.round_start("to complete from")
        sent = self.model.sent_names(server_round)
        if set(sent) != set(start):
            for reply in replies:
                complete_reply(reply, sent, start, self.model_dtypes)
        return self.inner.aggregate_train(server_round, replies)


def complete_reply(
    reply: Message,
    sent: Iterable[str],
    global_arrays: Mapping[str, np.ndarray],
    model_dtypes: Mapping[str, np.dtype],
) -> bool:
    """Fill the entries not `sent` into a reply whose one ArrayRecord holds exactly `sent`, in
    place; True when it did. Failed replies and any other shape of reply are left to validation."""
    if reply.has_error() or set(reply.content.array_records) != {wire.ARRAYS}:
        return False
    record = reply.content.array_records[wire.ARRAYS]
    if set(record) != set(sent) or not set(record) <= set(global_arrays):
        return False
    completed: dict[str, Array] = {}
    for name, values in global_arrays.items():
        if name in record:
            completed[name] = record[name]
        else:
            dtype = model_dtypes.get(name, values.dtype)
            completed[name] = Array(np.ascontiguousarray(values.astype(dtype, copy=False)))
    reply.content[wire.ARRAYS] = ArrayRecord(completed)
    return True
