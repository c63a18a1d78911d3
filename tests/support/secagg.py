"""Reading a SecAgg+ run's audit rows."""

from __future__ import annotations

import csv
from pathlib import Path


def audit_rows(path: Path) -> list[dict[str, str]]:
    with open(path / "audit.csv", newline="") as handle:
        return list(csv.DictReader(handle))
