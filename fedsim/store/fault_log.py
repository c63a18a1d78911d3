"""`faults.csv`: every client reply the server could not use, one row each, with its reason.

Warnings in a log scroll away; a user checking whether a federation went well, or a test
injecting faults, needs each failed, silent or rejected client per round in a file. Rows of a
round that a kill interrupted are dropped on resume, as in metrics.csv, so a resumed run's file
equals a straight run's but for `node_id` (Flower draws node ids anew each run; `partition_id`
is the stable name of a client).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedsim.store.csv_log import CsvLog

FAULTS_FILE = "faults.csv"
FAULT_COLUMNS = ("round", "stage", "partition_id", "node_id", "kind", "reason")

# `kind`: what happened to the reply.
FAILED = "failed"  # the client raised: Flower's error reply
NO_REPLY = "no-reply"  # nothing within round-timeout (a hung or dropped-out client)
REJECTED = "rejected"  # a reply that validation refused (NaN, wrong shape, norm outlier, ...)


@dataclass(frozen=True)
class FaultRow:
    """One unusable reply. `partition_id` is None when the server cannot tell (no reply from a
    deployed node whose partition it never learnt)."""

    round: int
    stage: str  # train or evaluate
    partition_id: int | None
    node_id: int
    kind: str
    reason: str


class FaultLog:
    """Appends fault rows to `<run dir>/faults.csv` (header written at creation)."""

    def __init__(self, run_dir: Path) -> None:
        self.log = CsvLog(run_dir / FAULTS_FILE, FAULT_COLUMNS)

    def record(self, rows: Iterable[FaultRow]) -> None:
        self.log.append(asdict(row) for row in rows)

    def drop_rounds_after(self, last_round: int) -> None:
        """Forget the faults of rounds a resumed run is about to redo."""
        self.log.drop_rows_after(last_round)
