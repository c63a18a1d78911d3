"""`fedsim audit`: the leakage of one model, without a federation.

For N samples it computes the exact gradient a FedSGD client with batch 1 would send, runs the
configured attacks on it, and scores them; it also reports the architecture's security metric.
Everything lands in one folder: `report.json`, `audit.csv`, `reconstructions.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacks.base import AttackError, observe_gradient
from audits.engine import UpdateAuditor
from audits.security_metric import SecurityReport, security_report
from models import ZooModel

STANDALONE_COLUMNS = ("sample", "label", "attack", "psnr", "ssim", "label_correct", "seconds", "note")


@dataclass
class StandaloneAudit:
    security: SecurityReport | None
    security_error: str | None
    rows: list[dict[str, Any]]

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per attack: mean PSNR / SSIM, label accuracy and seconds over the samples it ran on."""
        out: dict[str, dict[str, float]] = {}
        for attack in dict.fromkeys(r["attack"] for r in self.rows):
            ran = [r for r in self.rows if r["attack"] == attack and r["psnr"] is not None]
            labelled = [r["label_correct"] for r in ran if r["label_correct"] is not None]
            out[attack] = {
                "samples": len(ran),
                "mean_psnr": _mean([r["psnr"] for r in ran]),
                "mean_ssim": _mean([r["ssim"] for r in ran]),
                "label_accuracy": _mean(labelled),
                "mean_seconds": _mean([r["seconds"] for r in ran]),
            }
        return out


def _mean(values: list[float]) -> float | None:
    """None (JSON null) rather than NaN when an attack never ran."""
    return float(np.mean(values)) if values else None


def audit_model(
    model: ZooModel,
    inputs: np.ndarray,
    labels: np.ndarray,
    attack_names: list[str],
    seed: int = 0,
) -> tuple[StandaloneAudit, dict[str, list[np.ndarray | None]]]:
    """Attack each sample's exact batch-1 gradient; also compute the security metric."""
    try:
        security, security_error = security_report(model, tuple(inputs.shape[1:]), seed=seed), None
    except AttackError as err:
        security, security_error = None, str(err)
    auditor = UpdateAuditor(attack_names)
    rows: list[dict[str, Any]] = []
    images: dict[str, list[np.ndarray | None]] = {}
    for index, (x, y) in enumerate(zip(inputs, labels, strict=True)):
        update = observe_gradient(model, torch.from_numpy(x[None]), torch.tensor([int(y)]))
        for outcome in auditor.audit(update, x[None], np.array([y])):
            rows.append(
                {"sample": index, "label": int(y), "attack": outcome.attack, "psnr": outcome.psnr,
                 "ssim": outcome.ssim, "label_correct": outcome.label_correct, "seconds": outcome.seconds,
                 "note": outcome.note}
            )  # fmt: skip
            rec = outcome.reconstruction
            images.setdefault(outcome.attack, []).append(None if rec is None else rec.inputs[0].numpy())
    return StandaloneAudit(security, security_error, rows), images
