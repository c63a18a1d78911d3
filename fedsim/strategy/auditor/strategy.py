"""The server-side auditor: a strategy wrapper that attacks every (sampled) client update.

It sits in the chain where an honest-but-curious server stands (after reply validation, before
any central DP) and sees exactly what that server sees: the global model it sent and each
client's returned weights. It only decodes: the observed update, the threat model and the
optional truth go to `audits.scoring.engine.UpdateAuditor`, which attacks and scores.

- FedSGD, batch 1, one step: Δw / lr is the client's gradient (up to float32 rounding of the
  weights, so a larger learning rate leaks more precisely), and layer-wise inversion
  can recover the sample exactly when every layer's system has full rank.
- Batch > 1 or several local steps (FedAvg): Δw / (lr · steps) is only the mean gradient along
  the local trajectory; layer-wise inversion then solves for a single image that explains an
  average and generally fails, and optimisation attacks reconstruct at best a blend. Rows say
  which threat model applied.
- lr is each parameter's own, read once per round from the optimiser the family builds
  (`fedsim.training.client_step`); where that optimiser makes Δw no scaled mean gradient
  (momentum over several steps, Adam, weight decay, a per-step schedule, groups frozen this
  round), every row of the update says why in its note.

The batch size comes from what the server knows (the run config and the example count the
client reports), never from the truth. A node that opted in (`audit-truth`) also sends the
samples it trained on in a side record no strategy reads; without it, its update is attacked
all the same and its rows say the leakage could not be measured.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from audits.scoring.engine import (
    AUDIT_COLUMNS,
    AuditContext,
    Truth,
    UpdateAudit,
    UpdateAuditor,
    threat_model,
)
from audits.similarity.text import Decode
from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import dataset_for
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.csv_log import CsvLog
from fedsim.strategy.auditor.jobs import (
    PlainState,
    ReplyJob,
    audit_reply,
    draw_round,
    round_model,
    security_score,
    weights_around,
    with_rank_score,
)
from fedsim.strategy.auditor.pending import AuditQueue
from fedsim.strategy.base import StrategyWrapper
from fedsim.strategy.central_dp import OFF, central_dp_label
from fedsim.strategy.ordering import partition_of
from fedsim.training.client_step import ClientTraining
from fedsim.training.local import model_for
from models import ZooModel

__all__ = ["GRID_FOLDER", "AuditingStrategy", "auditing_wrapper", "drop_grids_after", "weights_around"]

GRID_FOLDER = "audit"

log = logging.getLogger(__name__)


class AuditingStrategy(StrategyWrapper):
    """Audits up to `max_clients` replies per round (0 = all), then lets `inner` aggregate them.

    `workers` > 0 attacks in that many worker processes while the next rounds train
    (`pending`); 0 attacks inside the round, in the server thread. Both write the same rows.
    Whoever runs the strategy calls `close()` at the end, which waits for pending audits.
    """

    def __init__(
        self,
        inner: Strategy,
        auditor: UpdateAuditor,
        make_model: Callable[[], ZooModel],
        training: ClientTraining,
        batch_size: int,
        output_dir: Path,
        max_clients: int = 0,
        server_defences: str = "",
        workers: int = 0,
    ) -> None:
        super().__init__(inner)
        self.server_defences = server_defences  # e.g. central DP's label, added to every row
        self.auditor = auditor
        self.make_model = make_model
        self.training = training  # how clients train: read into each round's client step
        self.batch_size = batch_size
        self.max_clients = max_clients
        self.log = CsvLog(output_dir / AUDIT_FILE, AUDIT_COLUMNS)
        self.grid_dir = output_dir / GRID_FOLDER
        self.grid_dir.mkdir(exist_ok=True)
        self._global: dict[str, torch.Tensor] | None = None
        self.queue = (
            AuditQueue(workers, auditor, make_model, self.training, self.grid_dir, self._write_rows)
            if workers > 0
            else None
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        if self.queue is not None:
            self.queue.start()  # the workers load while the round trains
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        audited = [r for r in replies if not r.has_error()][: self.max_clients or None]
        jobs: list[ReplyJob] = []
        if audited and self._global is not None:
            try:
                jobs = [self._decode(server_round, reply) for reply in audited]
                if self.queue is None:
                    self._audit_round(server_round, jobs)
            except Exception:  # the audit observes the federation; it must never stop it
                log.exception("round %d: the audit failed; the federation goes on", server_round)
                jobs = []
        if self.queue is not None and jobs:
            self.queue.submit(server_round, self._global, jobs)  # waits while the queue is full
        return self.inner.aggregate_train(server_round, replies)

    def after_audits(self, callback: Callable[[], None]) -> None:
        """Run `callback` (a round's checkpoint) once every audit submitted so far is written."""
        if self.queue is None:
            callback()
        else:
            self.queue.after(callback)

    def close(self) -> None:
        """Wait for pending audits (writing them, then what waited on them) and stop the workers."""
        if self.queue is not None:
            self.queue.close()

    def drop_rounds_after(self, last_round: int) -> None:
        """On resume: forget the rows and grids of rounds after the last complete one."""
        self.log.drop_rows_after(last_round)
        drop_grids_after(self.grid_dir, last_round)

    def _audit_round(self, server_round: int, jobs: list[ReplyJob]) -> None:
        """The serial audit: the same functions the workers run, in the server thread."""
        model = round_model(self.make_model, self._global)
        score = security_score(model)  # once per round
        step = self.training.step(model, server_round)  # once per round
        audits = [audit_reply(self.auditor, model, self._global, job, step) for job in jobs]
        self._write_rows(server_round, with_rank_score(audits, score))
        partitions = [job.context.partition_id for job in jobs]
        draw_round(audits, partitions, server_round, self.grid_dir, self.auditor.decode)

    def _write_rows(self, server_round: int, audits: list[UpdateAudit]) -> None:
        self.log.append(row.to_dict() for audit in audits for row in audit.rows)

    def _decode(self, server_round: int, reply: Message) -> ReplyJob:
        """What the server knows of a reply, as plain data: the batch size from the run config and
        the example count the client reports (never from the truth), its weights and its truth."""
        context = AuditContext(
            threat_model(self.batch_size, 1),
            defences=" ".join(filter(None, (_client_defences(reply), self.server_defences))),
            round=server_round,
            partition_id=partition_of(reply),
            batch_size=self.batch_size,
        )
        try:
            metrics = reply.content.metric_records[wire.METRICS]
            steps = int(metrics.get(wire.LOCAL_STEPS, 1))
            # A client trains at most `batch_size` samples a step, and fewer when it holds fewer.
            batch = max(1, min(self.batch_size, int(metrics[wire.NUM_EXAMPLES])))
            context = replace(context, threat=threat_model(batch, steps), batch_size=batch, local_steps=steps)
            truth = _truth(reply)
            local = PlainState.of(reply.content[wire.ARRAYS].to_torch_state_dict())
        except Exception as err:  # a reply the auditor cannot read must not stop the round
            return ReplyJob(context, None, None, f"reply not readable: {type(err).__name__}: {err}")
        return ReplyJob(context, local, truth)


def drop_grids_after(grid_dir: Path, last_round: int) -> None:
    """Delete the `round-NNNN` audit grids (.png) and text tables (.md) of rounds after
    `last_round` (resume)."""
    for grid in [*grid_dir.glob("round-*.png"), *grid_dir.glob("round-*.md")]:
        number = grid.stem.removeprefix("round-")
        if number.isdigit() and int(number) > last_round:
            grid.unlink()


def _client_defences(reply: Message) -> str:
    """The defence labels the client reported (empty: none, or an unreadable record)."""
    record = reply.content.config_records.get(wire.PRIVACY)
    value = record.get(wire.DEFENCES, "") if record is not None else ""
    return value if isinstance(value, str) else ""


def _truth(reply: Message) -> Truth | None:
    """The samples the node trained on, if it opted in to sharing them."""
    if wire.AUDIT_TRUTH not in reply.content.config_records:
        return None
    return Truth(*wire.decode_truth(reply.content.config_records[wire.AUDIT_TRUTH]))


def _decoder(config: RunConfig) -> Decode | None:
    """The dataset's tokenizer, so the auditor's ROUGE and BLEU read words; None for other data."""
    return None if dataset_for(config).tokenizer is None else _TokenDecoder(config)


@dataclass(frozen=True)
class _TokenDecoder:
    """The run's tokenizer's decode, picklable: an audit worker looks the tokenizer up in its own
    (per-process cached) copy of the dataset instead of receiving it."""

    config: RunConfig

    def __call__(self, ids: Sequence[int]) -> str:
        tokenizer = dataset_for(self.config).tokenizer
        assert tokenizer is not None
        return tokenizer.decode(ids)


def auditing_wrapper(config: RunConfig, output_dir: Path) -> Callable[[Strategy], AuditingStrategy]:
    """The auditor as a factory for the strategy chain: wraps whatever strategy comes after it."""

    def wrap(inner: Strategy) -> AuditingStrategy:
        return AuditingStrategy(
            inner,
            UpdateAuditor(config.attack_names(), _decoder(config)),
            make_model=functools.partial(model_for, config),  # picklable: workers build their own
            training=ClientTraining.of(config),
            batch_size=config.batch_size,
            output_dir=output_dir,
            max_clients=config.audit_clients,
            server_defences=central_dp_label(config) if config.central_dp != OFF else "",
            workers=config.audit_workers,
        )

    return wrap
