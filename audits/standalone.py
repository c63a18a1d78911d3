"""`fedsim audit`: the leakage of one model, without a federation.

For N samples it computes the exact gradient a FedSGD client with batch 1 would send, runs the
configured attacks on it through the same engine as the federated auditor, and scores them; it
also reports the architecture's security metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.base import Attack, observe_gradient
from audits.engine import (
    AuditContext,
    AuditRow,
    SecurityMeasure,
    Truth,
    UpdateAudit,
    UpdateAuditor,
    measure_security,
    threat_model,
)
from models import ZooModel

THREAT = threat_model(1, 1, exact=True)


@dataclass
class StandaloneAudit:
    """The security metric and one `UpdateAudit` per attacked sample."""

    security: SecurityMeasure
    updates: list[UpdateAudit]

    @property
    def rows(self) -> list[AuditRow]:
        return [row for update in self.updates for row in update.rows]

    @property
    def reconstructions(self) -> dict[str, list[np.ndarray | None]]:
        """Per attack, per sample: the reconstructed image (None where the attack declined or failed)."""
        attacks = dict.fromkeys(row.attack for row in self.rows)
        return {attack: [update.images.get(attack) for update in self.updates] for attack in attacks}


def audit_model(
    model: ZooModel,
    inputs: np.ndarray,
    labels: np.ndarray,
    attacks: Sequence[str | Attack],
    seed: int = 0,
    sample_ids: Sequence[int] | None = None,
) -> StandaloneAudit:
    """Attack each sample's exact batch-1 gradient; the security metric is computed once.

    `sample_ids` name the samples in the rows (e.g. their test-split indices; default 0..N-1).
    """
    security = measure_security(model, tuple(inputs.shape[1:]), seed=seed)
    auditor = UpdateAuditor(attacks)
    ids = list(range(len(inputs))) if sample_ids is None else [int(i) for i in sample_ids]
    updates = []
    for sample, x, y in zip(ids, inputs, labels, strict=True):
        # observe_gradient turns labels into targets itself, as a client's training does.
        update = observe_gradient(
            model, torch.from_numpy(np.ascontiguousarray(x[None])), torch.tensor([int(y)])
        )
        context = AuditContext(THREAT, sample=sample, rank_score=security.score)
        updates.append(auditor.audit(update, Truth(x[None], np.array([int(y)])), context))
    return StandaloneAudit(security, updates)
