"""`fedsim audit`'s output folder and the weights it reads: report.json, audit.csv, reconstructions.png."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file

from audits.report import save_grid
from audits.standalone import STANDALONE_COLUMNS, StandaloneAudit
from fedsim.errors import UserInputError
from fedsim.store.csv_log import CsvLog
from fedsim.store.files import staged_folder
from models import ZooModel


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
        CsvLog(staging / "audit.csv", STANDALONE_COLUMNS).append(audit.rows)
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        save_grid(inputs, images, staging / "reconstructions.png", captions=captions)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
