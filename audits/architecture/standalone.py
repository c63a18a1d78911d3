"""`fedsim audit`: the leakage of one model, without a federation.

For N samples it computes the exact gradient a FedSGD client with batch 1 would send (plus, if
asked, seeded Gaussian noise of a given std per entry, which the attacks are told about), runs
the configured attacks on it through the same engine as the federated auditor, and scores them;
it also reports the architecture's predictions (`audits.architecture.report`): the layer-wise
metric, the linear regions between the attacked samples, the end-to-end rank and the PSNR
ceiling at the noise the attacks faced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.base import Attack, ObservedUpdate, observe_gradient
from audits.architecture.report import ArchitectureReport, ObservationNoise, architecture_report
from audits.scoring.engine import (
    AuditContext,
    AuditRow,
    SecurityMeasure,
    Truth,
    UpdateAudit,
    UpdateAuditor,
    measure_security,
    threat_model,
)
from audits.scoring.text_table import text_table
from audits.similarity.text import Decode
from models import ZooModel
from models.base import model_label

THREAT = threat_model(1, 1, exact=True)


def threat_label(gradient_noise: float) -> str:
    """What the attacker observed: the exact gradient, or it plus N(0, sigma^2) per entry."""
    if gradient_noise == 0:
        return THREAT
    return f"fedsgd-b1 (exact gradient + N(0, {gradient_noise:g}^2))"


@dataclass
class StandaloneAudit:
    """The security metric, one `UpdateAudit` per attacked sample, and the architecture report."""

    security: SecurityMeasure
    updates: list[UpdateAudit]
    architecture: ArchitectureReport
    threat: str = THREAT
    text_table: str = ""  # token models: true vs recovered text, Markdown (`audits.scoring.text_table`)

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
    gradient_noise: float = 0.0,
    decode: Decode | None = None,
) -> StandaloneAudit:
    """Attack each sample's batch-1 gradient (exact, or plus N(0, gradient_noise^2) per entry,
    drawn from `seed` and the sample); the security metric and the end-to-end analysis (at the
    first sample) are computed once.

    `sample_ids` name the samples in the rows (e.g. their test-split indices; default 0..N-1).
    `decode` turns token ids into words for the text metrics (the dataset's tokenizer).
    """
    noise = ObservationNoise(gradient_noise)
    security = measure_security(model, tuple(inputs.shape[1:]), seed=seed)
    auditor = UpdateAuditor(attacks, decode)
    ids = list(range(len(inputs))) if sample_ids is None else [int(i) for i in sample_ids]
    threat = threat_label(gradient_noise)
    updates, exact_gradients = [], []
    for sample, x, y in zip(ids, inputs, labels, strict=True):
        context = AuditContext(threat, sample=sample, rank_score=security.score)
        if not model.trained_by_gradients:
            truth = Truth(x[None], np.array([int(y)]))
            updates.append(auditor.not_applicable(context, truth, no_gradient_note(model)))
            continue
        # observe_gradient turns labels into targets itself, as a client's training does.
        update = observe_gradient(
            model, torch.from_numpy(np.ascontiguousarray(x[None])), torch.tensor([int(y)])
        )
        exact_gradients.append(update.gradients)
        update = with_gradient_noise(update, gradient_noise, seed, sample)
        updates.append(auditor.audit(update, Truth(x[None], np.array([int(y)])), context))
    rows = [row for update in updates for row in update.rows]
    architecture = architecture_report(
        model,
        torch.from_numpy(np.ascontiguousarray(inputs[:1])),
        torch.from_numpy(np.array(labels[:1], dtype=np.int64)),
        noise,
        rows=rows,
        bound_sample=ids[0] if ids else None,
        security=security,
        gradients=exact_gradients[0] if exact_gradients else None,
        seed=seed,
        data=torch.from_numpy(np.ascontiguousarray(inputs)),  # linear regions between the samples
    )
    table = "" if decode is None else text_table(updates, decode)
    return StandaloneAudit(security, updates, architecture, threat, table)


def no_gradient_note(model: ZooModel) -> str:
    """Why the gradient attacks decline a family not trained by gradients."""
    return (
        f"not applicable: {model_label(model)} is not trained by gradients; its clients send no "
        "gradient and an unchanged model, but statistics of their samples (see the side channel below)"
    )


def with_gradient_noise(update: ObservedUpdate, sigma: float, seed: int, sample: int) -> ObservedUpdate:
    """The update plus seeded N(0, sigma^2) per gradient entry, its noise recorded for the
    attacks that weight their equations by it."""
    if sigma == 0:
        return update
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sample)
    noisy = {
        name: grad + sigma * torch.randn(grad.shape, generator=generator, dtype=grad.dtype)
        for name, grad in update.gradients.items()
    }
    noise = {name: torch.full_like(grad, sigma) for name, grad in noisy.items()}
    return dataclasses.replace(update, gradients=noisy, gradient_noise=noise)
