"""Reply validation: the gate between what clients send and what the auditor and aggregator see.

One bad client must not poison the global model, and a federation that diverged must not end as
a success. This wrapper sits right inside the ordering wrapper (see `fedsim.strategy.chain`):

- it rejects, with a logged reason, every reply whose records are missing, whose arrays are
  non-finite, not floating point, mis-shaped, or named differently from the global model's, whose
  metrics disagree with the other clients', and (when `reject_norm_ratio` > 0) whose update norm
  ‖Δw‖ exceeds that multiple of the round's median; rejected replies are dropped before the
  auditor and the aggregator, and count like clients that failed to train;
- a round in which no client's update is usable stops the federation (`RunFailedError`);
- so does an aggregated global model that is not finite (training diverged);
- every unusable reply, train or evaluate, is handed to `on_faults` (the run's `faults.csv`):
  rejected ones, clients that raised (Flower's error replies) and sampled clients that sent
  nothing within the round's timeout.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import wire
from fedsim.errors import RunFailedError
from fedsim.store.fault_log import FAILED, NO_REPLY, REJECTED, FaultRow
from fedsim.strategy.base import RoundStartWrapper

log = logging.getLogger(__name__)

DIVERGED = (
    "training diverged: the learning rate or momentum is likely too high; lower --learning-rate or --momentum"
)


FaultsObserver = Callable[[list[FaultRow]], None]
NO_REPLY_REASON = "no reply within round-timeout"


@dataclass(frozen=True)
class Rejection:
    """One reply refused by validation, and why (`diverged`: its weights were not finite)."""

    client: str
    reason: str
    diverged: bool = False
    reply: Message | None = None  # where it came from, for the fault log

    def __str__(self) -> str:
        return f"{self.client}: {self.reason}"


class ValidatingStrategy(RoundStartWrapper):
    """Drops invalid replies before `inner` sees them; stops the run when a round has no usable
    update or its aggregate is not finite. Stateless: the norm test uses this round only."""

    def __init__(
        self,
        inner: Strategy,
        reject_norm_ratio: float = 0.0,
        model_dtypes: Mapping[str, np.dtype] | None = None,
        on_faults: FaultsObserver | None = None,
    ) -> None:
        super().__init__(inner)
        self.reject_norm_ratio = reject_norm_ratio
        self.model_dtypes = dict(model_dtypes or {})
        self.on_faults = on_faults
        self._asked: dict[str, list[int]] = {}  # stage → nodes sent a message this round
        self._partitions: dict[int, int] = {}  # node id → partition id, as far as known

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._remember("train", super().configure_train(server_round, arrays, config, grid), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._remember("evaluate", messages, grid)

    def _remember(self, stage: str, messages: Iterable[Message], grid: Grid) -> list[Message]:
        """Note whom the round asks, to tell later who never answered."""
        messages = list(messages)
        self._asked[stage] = [message.metadata.dst_node_id for message in messages]
        partitions = getattr(grid, "partitions", None)  # fedsim's partition-ordered view
        if callable(partitions):
            self._partitions.update(partitions())
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept, rejections = screen_train_replies(
            replies, self.round_start("to check against"), self.reject_norm_ratio, self.model_dtypes
        )
        _log_rejections(server_round, "update", rejections)
        silent = self._record_faults(server_round, "train", replies, rejections)
        require_training(server_round, replies, rejections, silent)
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        require_finite_model(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        kept, rejections = screen_replies(replies, _metrics_problem)
        _log_rejections(server_round, "evaluation", rejections)
        self._record_faults(server_round, "evaluate", replies, rejections)
        return self.inner.aggregate_evaluate(server_round, kept)

    def _record_faults(
        self, server_round: int, stage: str, replies: list[Message], rejections: list[Rejection]
    ) -> int:
        """Hand every unusable reply of the round to `on_faults`, in partition order; the number
        of asked nodes that sent nothing."""
        for reply in replies:
            if not reply.has_error() and wire.CLIENT in reply.content.config_records:
                partition = reply.content.config_records[wire.CLIENT].get(wire.PARTITION_ID)
                if isinstance(partition, int):
                    self._partitions[reply.metadata.src_node_id] = partition
        answered = {reply.metadata.src_node_id for reply in replies}
        silent = [node for node in self._asked.pop(stage, []) if node not in answered]
        if silent:
            log.warning(
                "round %d: %d of %d clients sent no %s reply within the round timeout",
                server_round, len(silent), len(silent) + len(replies), stage,
            )  # fmt: skip
        rows = [self._row(server_round, stage, node, NO_REPLY, NO_REPLY_REASON) for node in silent]
        rows += [
            self._row(server_round, stage, r.metadata.src_node_id, FAILED, _client_error(r.error.reason))
            for r in replies
            if r.has_error()
        ]
        rows += [
            self._row(server_round, stage, r.reply.metadata.src_node_id, REJECTED, r.reason)
            for r in rejections
            if r.reply is not None
        ]
        if rows and self.on_faults is not None:
            big = 1 << 62
            rows.sort(key=lambda row: (big if row.partition_id is None else row.partition_id, row.node_id))
            self.on_faults(rows)
        return len(silent)

    def _row(self, server_round: int, stage: str, node: int, kind: str, reason: str) -> FaultRow:
        return FaultRow(server_round, stage, self._partitions.get(node), node, kind, reason)


def screen_train_replies(
    replies: Sequence[Message],
    global_arrays: dict[str, np.ndarray],
    reject_norm_ratio: float = 0.0,
    model_dtypes: Mapping[str, np.dtype] | None = None,
) -> tuple[list[Message], list[Rejection]]:
    """Replies to aggregate (errors pass through: strategies count them as failures) and the
    rejected ones, in reply order. `model_dtypes`: the dtype of each array as the client's model
    holds it (default: the global's; FedAdam's float64 global still gets float32 replies)."""
    dtypes = {name: array.dtype for name, array in global_arrays.items()} | dict(model_dtypes or {})

    def problem(content: RecordDict) -> tuple[str, bool] | None:
        return _metrics_problem(content) or _arrays_problem(content, global_arrays, dtypes)

    kept, rejections = screen_replies(replies, problem)
    if reject_norm_ratio > 0:
        kept, outliers = _reject_norm_outliers(kept, global_arrays, reject_norm_ratio)
        rejections += outliers
    return kept, rejections


def screen_replies(
    replies: Sequence[Message], problem_of: Callable[[RecordDict], tuple[str, bool] | None]
) -> tuple[list[Message], list[Rejection]]:
    """Split replies by `problem_of`, then reject replies whose metric names differ from the
    round's most common set (Flower's aggregation requires one set and raises otherwise)."""
    kept: list[Message] = []
    rejections: list[Rejection] = []
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        found = problem_of(reply.content)
        if found is None:
            kept.append(reply)
        else:
            rejections.append(Rejection(_client(reply), *found, reply=reply))
    names = [_metric_names(r) for r in kept if not r.has_error()]
    if names:
        usual = Counter(names).most_common(1)[0][0]
        for reply in [r for r in kept if not r.has_error() and _metric_names(r) != usual]:
            kept.remove(reply)
            reason = f"metrics {sorted(_metric_names(reply))} differ from the round's {sorted(usual)}"
            rejections.append(Rejection(_client(reply), reason, reply=reply))
    return kept, rejections


def require_training(
    server_round: int, replies: Sequence[Message], rejections: Sequence[Rejection] = (), silent: int = 0
) -> None:
    """Raise RunFailedError when no client's update is usable (all failed, were rejected or,
    `silent` of them, sent nothing within the round's timeout); warn when some clients failed."""
    if not replies and silent:
        raise RunFailedError(
            f"round {server_round}: none of the {silent} sampled clients replied within round-timeout; "
            "check that the clients run, or raise --round-timeout if they are just slow"
        )
    failed = [reply for reply in replies if reply.has_error()]
    if len(failed) + len(rejections) < len(replies) or not replies:
        if failed:
            log.warning("round %d: %d of %d clients failed to train", server_round, len(failed), len(replies))
        return
    if not rejections:
        raise RunFailedError(
            f"round {server_round}: all {len(replies)} clients failed to train "
            f"(first error: {_client_error(failed[0].error.reason)})"
        )
    hint = f"; {DIVERGED}" if any(r.diverged for r in rejections) else ""
    raise RunFailedError(
        f"round {server_round}: no usable update from {len(replies)} clients ({len(failed)} failed to "
        f"train, {len(rejections)} rejected; first rejected {rejections[0]}){hint}"
    )


def require_finite_model(server_round: int, arrays: ArrayRecord | None) -> None:
    """Raise RunFailedError if the aggregated global model holds NaN or Inf."""
    for name, array in (arrays or {}).items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise RunFailedError(
                f"round {server_round}: the aggregated global model has non-finite weights in {name!r}; "
                f"{DIVERGED}"
            )


def _metrics_problem(content: RecordDict) -> tuple[str, bool] | None:
    if set(content.metric_records) != {wire.METRICS}:
        return f"expected one MetricRecord {wire.METRICS!r}, got {sorted(content.metric_records)}", False
    weight = content.metric_records[wire.METRICS].get(wire.NUM_EXAMPLES)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < float("inf"):
        return f"{wire.NUM_EXAMPLES} is {weight!r}, not a positive number", False
    return None


def _arrays_problem(
    content: RecordDict, global_arrays: dict[str, np.ndarray], model_dtypes: Mapping[str, np.dtype]
) -> tuple[str, bool] | None:
    if set(content.array_records) != {wire.ARRAYS}:
        return f"expected one ArrayRecord {wire.ARRAYS!r}, got {sorted(content.array_records)}", False
    record = content.array_records[wire.ARRAYS]
    missing, extra = sorted(set(global_arrays) - set(record)), sorted(set(record) - set(global_arrays))
    if missing or extra:
        return f"array names differ from the global model's (missing {missing}, extra {extra})", False
    for name, reference in global_arrays.items():
        try:
            values = record[name].numpy()
        except Exception as err:  # any malformed payload is the sender's fault, never the server's crash
            return f"array {name!r} is unreadable ({type(err).__name__}: {err})", False
        wanted = model_dtypes.get(name, reference.dtype)
        if values.dtype != wanted:
            return f"array {name!r} has dtype {values.dtype}, the model's is {wanted}", False
        if values.shape != reference.shape:
            return f"array {name!r} has shape {values.shape}, the model's is {reference.shape}", False
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"non-finite weights in {name!r}", True
    return None


def update_norm(content: RecordDict, global_arrays: dict[str, np.ndarray]) -> float:
    """‖Δw‖ over every floating-point array (Δw = returned − global), in float64."""
    record = content.array_records[wire.ARRAYS]
    squares = 0.0
    for name, reference in global_arrays.items():
        if np.issubdtype(reference.dtype, np.floating):
            delta = record[name].numpy().astype(np.float64) - reference.astype(np.float64)
            squares += float(np.square(delta).sum())
    return float(np.sqrt(squares))


def _reject_norm_outliers(
    replies: list[Message], global_arrays: dict[str, np.ndarray], ratio: float
) -> tuple[list[Message], list[Rejection]]:
    """Reject updates longer than `ratio` × the median ‖Δw‖ of this round's valid updates.
    With one update there is nothing to compare with; a zero median rejects nothing."""
    norms = {id(r): update_norm(r.content, global_arrays) for r in replies if not r.has_error()}
    if len(norms) < 2:
        return replies, []
    limit = ratio * float(np.median(list(norms.values())))
    if limit <= 0:
        return replies, []
    kept, rejections = [], []
    for reply in replies:
        norm = norms.get(id(reply))
        if norm is not None and norm > limit:
            reason = f"update norm {norm:.4g} exceeds {ratio:g} × the round's median {limit / ratio:.4g}"
            rejections.append(Rejection(_client(reply), reason, reply=reply))
        else:
            kept.append(reply)
    return kept, rejections


def _metric_names(reply: Message) -> frozenset[str]:
    return frozenset(reply.content.metric_records[wire.METRICS])


def _client(reply: Message) -> str:
    client = reply.content.config_records.get(wire.CLIENT)
    if client is not None and isinstance(client.get(wire.PARTITION_ID), int):
        return f"client {client[wire.PARTITION_ID]}"
    return f"node {reply.metadata.src_node_id}"


def _log_rejections(server_round: int, what: str, rejections: list[Rejection]) -> None:
    for rejection in rejections:
        log.warning("round %d: rejected the %s of %s", server_round, what, rejection)


def _client_error(reason: str) -> str:
    """The exception's own message out of Flower's wrapping `<class ...>:<'... Message: text'>`."""
    last = reason.strip().splitlines()[-1] if reason.strip() else "no reason given"
    return last.rpartition("Message: ")[2].removesuffix("'>")
