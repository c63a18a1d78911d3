"""The server-side auditor: a strategy wrapper that attacks every (sampled) client update.

It wraps any `flwr.serverapp.strategy` strategy by composition, outside the DP wrappers, so it
sees exactly what an honest-but-curious server sees: the global model it sent and each client's
returned weights. From those it forms the observed update and runs the configured attacks:

- FedSGD, batch 1, one step: Δw / lr is the client's gradient (up to float32 rounding of the
  weights, so a larger learning rate leaks more precisely), and layer-wise inversion
  can recover the sample exactly when every layer's system has full rank.
- Batch > 1 or several local steps (FedAvg): Δw / (lr · steps) is only the mean gradient along
  the local trajectory (and SGD momentum distorts it further); layer-wise inversion then solves
  for a single image that explains an average and generally fails, and optimisation attacks
  reconstruct at best a blend. Rows say which threat model applied.

In simulation the client sends the samples it trained on in a side record (`audit-truth`) that
no strategy reads; the auditor scores reconstructions against them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from attacks.base import AttackError, ObservedUpdate
from audits.engine import AttackOutcome, UpdateAuditor, threat_model
from audits.report import AUDIT_COLUMNS, save_grid
from audits.security_metric import security_report
from fedsim.federation import wire
from fedsim.store.csv_log import CsvLog
from models import ZooModel

AUDIT_FILE = "audit.csv"
GRID_FOLDER = "audit"


class AuditingStrategy(Strategy):
    """Wraps a strategy; audits up to `max_clients` replies per round before aggregating."""

    def __init__(
        self,
        inner: Strategy,
        auditor: UpdateAuditor,
        make_model: Callable[[], ZooModel],
        learning_rate: float,
        batch_size: int,
        output_dir: Path,
        max_clients: int = 0,
    ) -> None:
        self.inner = inner
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
        audited = [r for r in replies if not r.has_error() and wire.AUDIT_TRUTH in r.content.config_records]
        if self.max_clients:
            audited = audited[: self.max_clients]
        if audited and self._global is not None:
            self._audit_round(server_round, audited)
        return self.inner.aggregate_train(server_round, replies)

    def _audit_round(self, server_round: int, replies: list[Message]) -> None:
        model = self.make_model()
        model.load_state_dict({k: v.float() for k, v in self._global.items()})
        input_shape = tuple(int(d) for d in model.spec.shape)
        rank_score = _rank_score(model, input_shape)
        rows, originals, recs, captions, titles = [], [], {}, {}, []
        for reply in replies:
            partition_id = int(reply.content.config_records[wire.CLIENT][wire.PARTITION_ID])
            titles.append(f"client {partition_id}")
            truth_x, truth_y = wire.decode_truth(reply.content.config_records[wire.AUDIT_TRUTH])
            steps = int(reply.content.metric_records[wire.METRICS].get(wire.LOCAL_STEPS, 1))
            batch = min(self.batch_size, len(truth_y))
            local = reply.content[wire.ARRAYS].to_torch_state_dict()
            names = [n for n, _ in model.named_parameters()]
            update = ObservedUpdate.from_weight_delta(
                model, {n: self._global[n] for n in names}, {n: local[n] for n in names},
                self.learning_rate, steps, input_shape, model.spec.num_classes, batch,
            )  # fmt: skip
            threat = threat_model(batch, steps)
            outcomes = self.auditor.audit(update, truth_x, truth_y)
            originals.append(truth_x[_best(outcomes).matched])
            for outcome in outcomes:
                rows.append(
                    {"round": server_round, "partition_id": partition_id, "attack": outcome.attack,
                     "threat": threat, "psnr": outcome.psnr, "ssim": outcome.ssim,
                     "label_correct": outcome.label_correct, "rank_score": rank_score,
                     "seconds": outcome.seconds, "note": outcome.note}
                )  # fmt: skip
                image = None if outcome.reconstruction is None else outcome.reconstruction.inputs[0].numpy()
                recs.setdefault(outcome.attack, []).append(image)
                caption = "n/a" if outcome.psnr is None else f"{outcome.psnr:.1f} dB"
                captions.setdefault(outcome.attack, []).append(caption)
        self.log.append(rows)
        save_grid(
            np.stack(originals),
            recs,
            self.grid_dir / f"round-{server_round:04d}.png",
            captions=captions,
            column_titles=titles,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def _best(outcomes: list[AttackOutcome]) -> AttackOutcome:
    """The outcome with the highest PSNR: the grid shows the true sample it was paired with
    (a multi-sample update has many; this is the one the attacks got closest to)."""
    return max(outcomes, key=lambda o: -1.0 if o.psnr is None else o.psnr)


def _rank_score(model: ZooModel, input_shape: tuple[int, ...]) -> float | None:
    """The architecture's security score at the current weights; None where layer-wise
    inversion does not apply (the metric is defined on the same per-layer systems)."""
    try:
        return float(security_report(model, input_shape).score)
    except AttackError:
        return None
