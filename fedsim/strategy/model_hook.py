"""The model's server-side round hook: a family may rewrite the aggregated global model from the
extra records its clients sent beside their weights (ProtoPNet writes its pushed prototypes).

It sits right inside reply validation (see `fedsim.strategy.chain`), so it sees only validated
updates and its result is checked for finiteness like any aggregate. Extra records are
validated here the way updates are there: a record that cannot be decoded, holds non-finite
numbers, or that the model finds unusable (`ZooModel.extra_record_problem`, e.g. a wrong shape)
is dropped with a logged reason. The hook is stateless (a function of the round's starting
global model, the aggregate, the records and the round), so a resumed run repeats a straight
one exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedsim import wire
from fedsim.strategy.base import RoundStartWrapper
from fedsim.strategy.ordering import partition_of
from models import TrainingSettings, ZooModel
from models.base import ExtraRecord

log = logging.getLogger(__name__)


def overrides_after_aggregation(model: ZooModel) -> bool:
    """Whether the family has a server-side hook (the chain skips this wrapper otherwise)."""
    return type(model).after_aggregation is not ZooModel.after_aggregation


class ModelRoundHook(RoundStartWrapper):
    """Calls `model.after_aggregation` on every round's aggregate with the round's valid extra
    records; everything else is delegated."""

    def __init__(self, inner: Strategy, model: ZooModel, settings: TrainingSettings) -> None:
        super().__init__(inner)
        self.model = model
        self.settings = settings

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        previous = self.round_start("to hand the hook")
        records = [valid_extra_records(server_round, reply, self.model) for reply in replies]
        aggregated = {name: array.numpy() for name, array in arrays.items()}
        result = self.model.after_aggregation(
            aggregated, previous, [r for r in records if r], self.settings, server_round
        )
        _check_same_layout(aggregated, result)
        return ArrayRecord({name: Array(np.ascontiguousarray(result[name])) for name in aggregated}), metrics


def valid_extra_records(server_round: int, reply: Message, model: ZooModel) -> dict[str, ExtraRecord]:
    """The reply's extra records that decode, are finite and that the model accepts; each other
    one is logged and dropped. Failed replies have none."""
    if reply.has_error():
        return {}
    kept: dict[str, ExtraRecord] = {}
    for key, record in reply.content.config_records.items():
        if not key.startswith(wire.EXTRA_PREFIX):
            continue
        name = key.removeprefix(wire.EXTRA_PREFIX)
        problem, payload = _record_problem(name, record, model)
        if problem is None and payload is not None:
            kept[name] = payload
        else:
            log.warning(
                "round %d: rejected the extra record %r of client %s: %s",
                server_round,
                name,
                partition_of(reply),
                problem,
            )
    return kept


def _record_problem(
    name: str, record: ConfigRecord, model: ZooModel
) -> tuple[str | None, ExtraRecord | None]:
    try:
        payload = wire.decode_extra(record)
    except Exception as err:  # a malformed payload is the sender's fault, never the server's crash
        return f"undecodable ({type(err).__name__}: {err})", None
    for key, value in payload.items():
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
            return f"field {key!r} has dtype {value.dtype}, not a number", None
        if isinstance(value, np.ndarray | float | int) and not np.isfinite(np.asarray(value, float)).all():
            return f"field {key!r} holds non-finite values", None
    return model.extra_record_problem(name, payload), payload


def _check_same_layout(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> None:
    """A hook may change values only: the same names, shapes and dtypes (a bug otherwise)."""
    if set(before) != set(after):
        raise ValueError(
            f"after_aggregation changed the model's array names: {sorted(set(before) ^ set(after))}"
        )
    for name, array in before.items():
        new = after[name]
        if new.shape != array.shape or new.dtype != array.dtype:
            raise ValueError(
                f"after_aggregation changed {name!r} from {array.dtype}{array.shape} "
                f"to {new.dtype}{new.shape}"
            )
