"""Federations audited in worker processes: the serial audit's rows; a dead worker costs no round."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from fedsim.strategy.auditor.pending import CRASH_NOTE
from fedsim.strategy.auditor.strategy import GRID_FOLDER
from tests.support.audit_workers import audit_rows_of, auditing_strategy_for, grid_bytes_of
from tests.support.audited_replies import train_reply_of
from tests.support.runs import run_fedsim

CRASH_PREFIX = CRASH_NOTE.split("(")[0]


class DiesOnBatchTwo:
    """Kills the process attacking it (as a segfault or the OOM killer would) on a batch-2 update."""

    name = "dies-on-batch-2"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        if update.batch_size == 2:
            os._exit(3)
        raise AttackError("this test attack only faces batch-2 updates")


@pytest.mark.slow  # several pools: the crash breaks one, each job then in flight reruns in its own
def test_a_worker_that_dies_costs_its_update_an_error_row_and_no_round(tmp_path: Path) -> None:
    strategy, inner = auditing_strategy_for(
        tmp_path, [DiesOnBatchTwo(), "analytic-fc"], workers=1, batch_size=8
    )
    rounds = {
        1: [train_reply_of(0, 0)],
        2: [train_reply_of(0, 1), train_reply_of(1, 2, num_examples=2)],
        3: [train_reply_of(0, 3)],
    }
    for server_round, replies in rounds.items():
        strategy.aggregate_train(server_round, replies)
    strategy.close()
    assert [len(replies) for replies in inner.aggregated] == [1, 2, 1]  # every round aggregated
    rows = audit_rows_of(tmp_path)
    assert [(r["round"], r["partition_id"], r["attack"], r["status"]) for r in rows] == [
        ("1", "0", "dies-on-batch-2", "declined"),
        ("1", "0", "analytic-fc", "reconstructed"),
        ("2", "0", "dies-on-batch-2", "declined"),
        ("2", "0", "analytic-fc", "reconstructed"),
        ("2", "1", "dies-on-batch-2", "failed"),  # the update whose attack killed its worker
        ("2", "1", "analytic-fc", "failed"),
        ("3", "0", "dies-on-batch-2", "declined"),
        ("3", "0", "analytic-fc", "reconstructed"),
    ]
    assert rows[4]["note"].startswith(CRASH_PREFIX) and rows[5]["note"] == rows[4]["note"]
    assert float(rows[3]["psnr"]) >= 60  # its round-mate keeps its real result
    assert [p.name for p in sorted((tmp_path / GRID_FOLDER).iterdir())] == [
        f"round-000{r}.png" for r in (1, 2, 3)
    ]


@pytest.mark.slow
def test_a_federation_audited_by_workers_matches_the_serial_one(tmp_path: Path) -> None:
    """audit.csv (but its timing column), the grids, and metrics.csv (but its timings) agree."""
    for workers in (0, 1):
        result = run_fedsim(
            ["run", "--name", f"w{workers}", "--dataset", "digits", "--model", "mlp", "--clients", "3",
             "--rounds", "2", "--batch-size", "1", "--max-local-steps", "1", "--fraction-evaluate", "0",
             "--audit", "--audit-attacks", "analytic-fc,layerwise", "--audit-clients", "0",
             "--audit-workers", str(workers)],
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    serial, parallel = tmp_path / "runs" / "w0", tmp_path / "runs" / "w1"
    rows = audit_rows_of(parallel)
    assert len(rows) == 2 * 3 * 2 and rows == audit_rows_of(serial)
    assert sorted((r["round"], r["partition_id"]) for r in rows) == [
        (str(rnd), str(client)) for rnd in (1, 2) for client in (0, 1, 2) for _ in range(2)
    ]
    assert grid_bytes_of(parallel) == grid_bytes_of(serial)

    def metrics(run: Path) -> list[dict[str, str]]:
        with open(run / "metrics.csv", newline="") as handle:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]

    assert metrics(parallel) == metrics(serial)
    assert sorted(p.name for p in (parallel / "checkpoints").iterdir()) == sorted(
        p.name for p in (serial / "checkpoints").iterdir()
    )
