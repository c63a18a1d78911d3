"""Append-only CSV logs with a fixed header (metrics.csv, audit.csv, faults.csv), and reading one back."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.store.files import drop_csv_rows_after


class CsvLog:
    """Appends rows to a CSV with a fixed header (written once)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = tuple(columns)
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle, lineterminator="\n").writerow(self.columns)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns, lineterminator="\n")
            for row in rows:
                writer.writerow({k: _cell(row.get(k)) for k in self.columns})

    def drop_rows_after(self, last_round: int) -> None:
        """Forget rows of an interrupted round, as the run store does for metrics.csv."""
        drop_csv_rows_after(self.path, self.columns, last_round)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Every row of a run's CSV log as text; none when the log was never written (no audit, no DP)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly: equal runs give equal files
    return str(value)
