"""The auditor under secure aggregation: it attacks the only update the server sees, the sum.

Under SecAgg+ no client's update ever reaches the server, so per-client auditing is impossible.
What a curious server can attack is the round's aggregate: Δ = new global − previous global,
the example-weighted mean of the clients' updates. It is handed to the same engine as a
client's update (`audits.scoring.engine.UpdateAuditor`), as one large batch of all the round's examples
and the clients' mean number of local steps (both sent in clear under Flower's SecAgg+), and its
rows land in the same `audit.csv` and `audit/round-NNNN.png`, with an empty partition id and a
note saying what was attacked and why. The server gets no client's samples, so the leakage is not
scored against any. The gradient is estimated with the round's client step (each parameter's
own learning rate, `fedsim.training.client_step`), and the note says when that estimate is
approximate. An audit that fails is logged; it never stops the federation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from audits.scoring.engine import AUDIT_COLUMNS, NO_TRUTH_NOTE, AuditContext, UpdateAuditor, measure_security
from audits.scoring.summary import save_audit_grid
from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.csv_log import CsvLog
from fedsim.strategy.auditor.jobs import with_approximation_note
from fedsim.strategy.auditor.strategy import GRID_FOLDER, drop_grids_after, weights_around
from fedsim.strategy.secagg_fedavg import AggregateRound
from fedsim.training.client_step import ClientTraining
from fedsim.training.local import model_for
from models.base import load_federated_state

log = logging.getLogger(__name__)

PER_CLIENT_IMPOSSIBLE = (
    "per-client auditing is impossible under secure aggregation: the server sees only the sum of "
    "the round's updates, attacked here as one batch"
)
NO_SAMPLES_NOTE = "leakage not measurable: under SecAgg+ the server receives no client's samples"


# How audit rows name secure aggregation in their `defences` column, after the clients' own.
SECAGG_LABEL = "secagg"


def aggregate_threat(clients: int, batch: int, steps: int) -> str:
    """The threat-model label of an attack on a SecAgg+ aggregate."""
    return (
        f"SecAgg+ aggregate of {clients} clients (b={batch}, s={steps}; gradient estimated as dw/(lr*steps))"
    )


class AggregateAuditor:
    """An observer of `SecAggFedAvg`: audits each round's aggregate update."""

    def __init__(self, config: RunConfig, output_dir: Path) -> None:
        self.config = config
        self.auditor = UpdateAuditor(config.attack_names())
        self.log = CsvLog(output_dir / AUDIT_FILE, AUDIT_COLUMNS)
        self.grid_dir = output_dir / GRID_FOLDER
        self.grid_dir.mkdir(exist_ok=True)

    def __call__(self, aggregate: AggregateRound) -> None:
        try:
            self._audit(aggregate)
        except Exception:  # the audit observes the federation; it must never stop it
            log.exception(
                "round %d: the audit of the aggregate failed; the federation goes on", aggregate.server_round
            )

    def drop_rounds_after(self, last_round: int) -> None:
        """On resume: forget the rows and grids of rounds after the last complete one."""
        self.log.drop_rows_after(last_round)
        drop_grids_after(self.grid_dir, last_round)

    def _audit(self, aggregate: AggregateRound) -> None:
        model = model_for(self.config)  # the whole model: the federated state over a fresh build
        load_federated_state(
            model, {k: torch.from_numpy(np.array(v)).float() for k, v in aggregate.before.items()}
        )
        before, after = weights_around(
            model,
            {n: torch.from_numpy(np.array(v)) for n, v in aggregate.before.items()},
            {n: torch.from_numpy(np.array(v)) for n, v in aggregate.after.items()},
        )
        batch = max(aggregate.total_examples, 1)
        steps = _mean_steps(aggregate)
        reported = (
            str(wire.privacy_from_metrics(c.metrics).get(wire.DEFENCES, "")).split()
            for c in aggregate.clients
        )
        defences = list(dict.fromkeys(label for labels in reported for label in labels))
        threat = aggregate_threat(len(aggregate.clients), batch, steps)
        context = AuditContext(
            threat,
            defences=" ".join([*defences, SECAGG_LABEL]),
            round=aggregate.server_round,
            partition_id=None,
            batch_size=batch,
            local_steps=steps,
            rank_score=measure_security(model, tuple(model.spec.shape)).score,
        )
        step = ClientTraining.of(self.config).step(model, aggregate.server_round)
        update = step.observe(model, before, after, steps, batch)
        audit = self.auditor.audit(update, None, context)
        for row in audit.rows:
            rest = (
                NO_SAMPLES_NOTE
                if row.note == NO_TRUTH_NOTE
                else row.note.replace(NO_TRUTH_NOTE, NO_SAMPLES_NOTE)
            )
            row.note = f"{PER_CLIENT_IMPOSSIBLE}; {rest}" if rest else PER_CLIENT_IMPOSSIBLE
        with_approximation_note(audit, update)
        audit.original_note = "no samples\nunder SecAgg+"
        self.log.append(row.to_dict() for row in audit.rows)
        save_audit_grid(
            [audit],
            self.grid_dir / f"round-{aggregate.server_round:04d}.png",
            title=f"round {aggregate.server_round}, threat: {threat}",
            column_titles=[f"sum of {len(aggregate.clients)} clients"],
        )


def _mean_steps(aggregate: AggregateRound) -> int:
    """The clients' local steps, averaged with the aggregate's own weights (example counts)."""
    weighted = [(c.num_examples, c.metrics.get(wire.LOCAL_STEPS)) for c in aggregate.clients]
    known = [(n, float(s)) for n, s in weighted if isinstance(s, int | float) and n > 0]
    if not known:
        return 1
    return max(1, round(sum(n * s for n, s in known) / sum(n for n, _ in known)))
