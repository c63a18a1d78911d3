"""`fedsim audit`: the leakage of one model, without a federation.

For N samples it computes the exact gradient a FedSGD client with batch 1 would send, runs the
configured attacks on it, and scores them; it also reports the architecture's security metric.
Everything lands in one folder: `report.json`, `audit.csv`, `reconstructions.png`.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from attacks.base import AttackError, observe_gradient
from audits.auditor import UpdateAuditor
from audits.report import AuditLog, save_grid
from audits.security_metric import SecurityReport, security_report
from fedsim.errors import UserInputError
from fedsim.files import staged_folder
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


def load_weights(model: ZooModel, path: Path) -> None:
    """Load a safetensors file (e.g. a run checkpoint) into `model`; no pickle is ever read."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserInputError(f"cannot read weights {path}: {err}; pass a .safetensors file") from None
    expected = dict(model.state_dict())
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        raise UserInputError(
            f"weights {path} do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {wrong[:3]}); pass the --model, --data and --image-size they were trained with"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()})


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


def check_output_folder(folder: Path) -> None:
    """Before any attack runs: the folder must be new and its parent writable."""
    if folder.exists():
        raise UserInputError(f"output folder {folder} already exists; pass another --out")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(folder.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as err:
        raise UserInputError(
            f"cannot write the audit to {folder} ({err.strerror or err}); pass a writable --out"
        ) from None


def write_audit(
    folder: Path,
    audit: StandaloneAudit,
    inputs: np.ndarray,
    images: dict[str, list[np.ndarray | None]],
    settings: dict[str, Any],
) -> None:
    """report.json, audit.csv and reconstructions.png in `folder` (which must not exist yet),
    staged so that a failure leaves nothing half-written."""
    report = {
        "settings": settings,
        "security": audit.security.to_dict() if audit.security else None,
        "security_error": audit.security_error,
        "attacks": audit.summary(),
        "samples": audit.rows,
    }
    captions = {
        attack: [
            "n/a" if r["psnr"] is None else f"{r['psnr']:.1f} dB" for r in audit.rows if r["attack"] == attack
        ]
        for attack in images
    }
    with staged_folder(folder) as staging:
        AuditLog(staging / "audit.csv", STANDALONE_COLUMNS).append(audit.rows)
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        save_grid(inputs, images, staging / "reconstructions.png", captions=captions)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
