"""An auditing strategy with audit workers, and the rows and grids it writes (vs the serial audit)."""

from __future__ import annotations

import csv
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord

from audits.scoring.engine import UpdateAuditor
from fedsim.strategy.auditor.strategy import AUDIT_FILE, GRID_FOLDER, AuditingStrategy
from tests.support.audited_replies import PLAIN_SGD, Recorder, digits_mlp


def auditing_strategy_for(tmp_path: Path, attacks: list[object], workers: int, batch_size: int = 1) -> tuple:
    tmp_path.mkdir(parents=True, exist_ok=True)
    inner = Recorder()
    strategy = AuditingStrategy(
        inner, UpdateAuditor(attacks), digits_mlp, PLAIN_SGD, batch_size, tmp_path, workers=workers
    )
    strategy.configure_train(1, ArrayRecord(digits_mlp().state_dict()), ConfigRecord(), grid=None)
    return strategy, inner


def audit_rows_of(folder: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict[str, str]]:
    with open(folder / AUDIT_FILE, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def grid_bytes_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / GRID_FOLDER).iterdir())}
