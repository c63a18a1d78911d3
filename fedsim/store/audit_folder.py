"""`fedsim audit`'s output folder and the weights it reads: report.json, audit.csv,
reconstructions.png (and text_table.md for token models)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from audits.architecture.standalone import StandaloneAudit
from audits.scoring.engine import AUDIT_COLUMNS
from audits.scoring.summary import save_audit_grid, summarise_audit
from fedsim.errors import UserInputError
from fedsim.store.csv_log import CsvLog
from fedsim.store.files import staged_folder
from fedsim.store.run_store import state_fit_problems
from models import ZooModel
from models.base import federated_state, load_federated_state

AUDIT_FILE = "audit.csv"  # the same name and columns as a federated run's audit log
GRID_FILE = "reconstructions.png"
TEXT_TABLE_FILE = "text_table.md"  # token models: true vs recovered text, differences marked


def load_weights(model: ZooModel, path: Path) -> None:
    """Load a safetensors file (e.g. a run checkpoint: the federated model) into `model`'s
    federated entries, the rest as built; no pickle is ever read."""
    if path.is_dir():  # safetensors' own message for it is "No such device"
        raise UserInputError(f"weights {path} is a folder; pass a .safetensors file in it")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserInputError(f"cannot read weights {path}: {err}; pass a .safetensors file") from None
    own = federated_state(model)
    problems = state_fit_problems(state, own)
    if problems:
        raise UserInputError(
            f"weights {path} do not fit this model ({', '.join(problems[:3])}); "
            "pass the --model, --dataset and --image-size they were trained with"
        )
    poisoned = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if poisoned:  # NaN weights would make every attack's numbers NaN, not a finding
        raise UserInputError(
            f"weights {path} hold non-finite values in {', '.join(poisoned[:3])}; "
            "pass a checkpoint of a run that did not diverge"
        )
    # In the model's own dtype: float32 for the zoo's networks, float64 for LEDL's dictionary.
    load_federated_state(model, {k: v.to(own[k].dtype) for k, v in state.items()})


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


def write_audit(folder: Path, audit: StandaloneAudit, settings: dict[str, Any]) -> None:
    """report.json, audit.csv and reconstructions.png in `folder` (which must not exist yet),
    staged so that a failure leaves nothing half-written. `settings` (model, data, weights,
    samples, ...) go into report.json and name the grid."""
    rows = [row.to_dict() for row in audit.rows]
    report = {
        "settings": settings,
        "security": audit.security.report.to_dict() if audit.security.report else None,
        "security_error": audit.security.note or None,
        # The architecture report repeats "security" as its "layerwise" part, beside the
        # end-to-end rank, the PSNR ceiling and each attack's PSNR against it.
        "architecture": audit.architecture.to_dict(),
        "attacks": {s["attack"]: s for s in summarise_audit(audit.rows)},
        "rows": rows,
    }
    title = (
        f"fedsim audit: {settings.get('model')} on {settings.get('dataset')}, "
        f"weights {Path(settings['weights']).name if settings.get('weights') else 'initial (seeded)'}; "
        f"threat: {audit.threat}"
    )
    column_titles = [
        f"sample {u.rows[0].sample}\nlabel {u.rows[0].true_labels}" if u.rows else "" for u in audit.updates
    ]
    with staged_folder(folder) as staging:
        CsvLog(staging / AUDIT_FILE, AUDIT_COLUMNS).append(rows)
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        save_audit_grid(audit.updates, staging / GRID_FILE, title, column_titles)
        if audit.text_table:
            (staging / TEXT_TABLE_FILE).write_text(f"# {title}\n\n{audit.text_table}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
