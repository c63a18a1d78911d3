"""The server-side auditor: a strategy wrapper that attacks every (sampled) client update.

It sits in the chain where an honest-but-curious server stands (after reply validation, before
any central DP) and sees exactly what that server sees: the global model it sent and each
client's returned weights. It only decodes: the observed update, the threat model and the
optional truth go to `audits.engine.UpdateAuditor`, which attacks and scores.

- FedSGD, batch 1, one step: Δw / lr is the client's gradient (up to float32 rounding of the
  weights, so a larger learning rate leaks more precisely), and layer-wise inversion
  can recover the sample exactly when every layer's system has full rank.
- Batch > 1 or several local steps (FedAvg): Δw / (lr · steps) is only the mean gradient along
  the local trajectory (and SGD momentum distorts it further); layer-wise inversion then solves
  for a single image that explains an average and generally fails, and optimisation attacks
  reconstruct at best a blend. Rows say which threat model applied.

The batch size comes from what the server knows (the run config and the example count the
client reports), never from the truth. A node that opted in (`audit-truth`) also sends the
samples it trained on in a side record no strategy reads; without it, its update is attacked
all the same and its rows say the leakage could not be measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from attacks.base import ObservedUpdate
from audits.engine import (
    AUDIT_COLUMNS,
    AuditContext,
    Truth,
    UpdateAudit,
    UpdateAuditor,
    measure_security,
    threat_model,
)
from audits.report import save_audit_grid
from audits.text_metrics import Decode
from audits.text_table import text_table
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import dataset_for
from fedsim.federation import wire
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.csv_log import CsvLog
from fedsim.strategy.base import StrategyWrapper
from fedsim.strategy.central_dp import OFF, central_dp_label
from fedsim.strategy.ordering import partition_of
from fedsim.training.local import model_for
from models import ZooModel
from models.base import load_federated_state

GRID_FOLDER = "audit"

log = logging.getLogger(__name__)


class AuditingStrategy(StrategyWrapper):
    """Audits up to `max_clients` replies per round (0 = all), then lets `inner` aggregate them."""

    def __init__(
        self,
        inner: Strategy,
        auditor: UpdateAuditor,
        make_model: Callable[[], ZooModel],
        learning_rate: float,
        batch_size: int,
        output_dir: Path,
        max_clients: int = 0,
        server_defences: str = "",
    ) -> None:
        super().__init__(inner)
        self.server_defences = server_defences  # e.g. central DP's label, added to every row
        self.auditor = auditor
        self.make_model = make_model
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_clients = max_clients
        self.log = CsvLog(output_dir / AUDIT_FILE, AUDIT_COLUMNS)
        self.grid_dir = output_dir / GRID_FOLDER
        self.grid_dir.mkdir(exist_ok=True)
        self._global: dict[str, torch.Tensor] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        audited = [r for r in replies if not r.has_error()][: self.max_clients or None]
        if audited and self._global is not None:
            try:
                self._audit_round(server_round, audited)
            except Exception:  # the audit observes the federation; it must never stop it
                log.exception("round %d: the audit failed; the federation goes on", server_round)
        return self.inner.aggregate_train(server_round, replies)

    def drop_rounds_after(self, last_round: int) -> None:
        """On resume: forget the rows and grids of rounds after the last complete one."""
        self.log.drop_rows_after(last_round)
        drop_grids_after(self.grid_dir, last_round)

    def _audit_round(self, server_round: int, replies: list[Message]) -> None:
        model = self.make_model()  # the whole model: the global federated state over a fresh build
        load_federated_state(model, {k: v.float() for k, v in self._global.items()})
        rank_score = measure_security(model, tuple(model.spec.shape)).score  # once per round
        audits = [self._audit_reply(server_round, reply, model, rank_score) for reply in replies]
        self.log.append(row.to_dict() for audit in audits for row in audit.rows)
        threats = list(dict.fromkeys(row.threat for audit in audits for row in audit.rows))
        titles = [f"client {partition_of(reply)}" for reply in replies]
        if len(threats) > 1:
            titles = [f"{t}\n{a.rows[0].threat.split()[0]}" for t, a in zip(titles, audits, strict=True)]
        title = f"round {server_round}, threat: {' / '.join(threats)}"
        save_audit_grid(
            audits, self.grid_dir / f"round-{server_round:04d}.png", title=title, column_titles=titles
        )
        table = text_table(audits, self.auditor.decode) if self.auditor.decode is not None else ""
        if table:  # token models: each client's true text beside what each attack recovered
            (self.grid_dir / f"round-{server_round:04d}.md").write_text(f"# {title}\n\n{table}")

    def _audit_reply(
        self, server_round: int, reply: Message, model: ZooModel, rank_score: float | None
    ) -> UpdateAudit:
        context = AuditContext(
            threat_model(self.batch_size, 1),
            defences=" ".join(filter(None, (_client_defences(reply), self.server_defences))),
            round=server_round,
            partition_id=partition_of(reply),
            batch_size=self.batch_size,
            rank_score=rank_score,
        )
        try:
            metrics = reply.content.metric_records[wire.METRICS]
            steps = int(metrics.get(wire.LOCAL_STEPS, 1))
            # What the server knows: a client trains at most `batch_size` samples a step, and
            # fewer when it holds fewer (it reports how many it trained on).
            batch = max(1, min(self.batch_size, int(metrics[wire.NUM_EXAMPLES])))
            context = replace(context, threat=threat_model(batch, steps), batch_size=batch, local_steps=steps)
            truth = _truth(reply)
            update = self._observe(reply, model, batch, steps)
        except Exception as err:  # a reply the auditor cannot read must not stop the round
            return self.auditor.unreadable(context, f"reply not readable: {type(err).__name__}: {err}")
        return self.auditor.audit(update, truth, context)

    def _observe(self, reply: Message, model: ZooModel, batch: int, steps: int) -> ObservedUpdate:
        local = reply.content[wire.ARRAYS].to_torch_state_dict()
        before, after = weights_around(model, self._global, local)
        return ObservedUpdate.from_weight_delta(
            model, before, after,
            self.learning_rate, steps, tuple(model.spec.shape), model.spec.num_classes, batch,
        )  # fmt: skip


def weights_around(
    model: ZooModel, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every parameter of `model` before and after a round: a federated one from the entries
    given (KeyError when one lacks it), one outside the federated model (a frozen pretrained
    base) the model's own value on both sides, so its observed update is exactly zero."""
    federated = set(model.federated_names())
    own = {name: p.detach() for name, p in model.named_parameters()}
    return (
        {name: before[name] if name in federated else value for name, value in own.items()},
        {name: after[name] if name in federated else value for name, value in own.items()},
    )


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
    tokenizer = dataset_for(config).tokenizer
    return None if tokenizer is None else tokenizer.decode


def auditing_wrapper(config: RunConfig, output_dir: Path) -> Callable[[Strategy], AuditingStrategy]:
    """The auditor as a factory for the strategy chain: wraps whatever strategy comes after it."""

    def wrap(inner: Strategy) -> AuditingStrategy:
        return AuditingStrategy(
            inner,
            UpdateAuditor(config.attack_names(), _decoder(config)),
            make_model=lambda: model_for(config),
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            output_dir=output_dir,
            max_clients=config.audit_clients,
            server_defences=central_dp_label(config) if config.central_dp != OFF else "",
        )

    return wrap
