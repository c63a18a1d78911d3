"""The audit in worker processes (`audit-workers` > 0): the same rows and grids as the serial
audit, in order, with a bounded queue, checkpoints after their round's audit, and a worker that
dies costing its update an error row, never a round."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from audits.engine import UpdateAuditor
from fedsim.strategy.audit_queue import CRASH_NOTE, MAX_PENDING_ROUNDS
from fedsim.strategy.auditing import AUDIT_FILE, GRID_FOLDER, AuditingStrategy
from tests.conftest import run_fedsim
from tests.test_auditing_strategy import LR, Recorder, _model, _reply

CRASH_PREFIX = CRASH_NOTE.split("(")[0]


class DiesOnBatchTwo:
    """Kills the process attacking it (as a segfault or the OOM killer would) on a batch-2 update."""

    name = "dies-on-batch-2"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        if update.batch_size == 2:
            os._exit(3)
        raise AttackError("this test attack only faces batch-2 updates")


class Slow:
    """Takes its time, so rounds queue up behind it."""

    name = "slow"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        time.sleep(0.5)
        raise AttackError("slow on purpose")


def _strategy(tmp_path: Path, attacks: list[object], workers: int, batch_size: int = 1) -> tuple:
    tmp_path.mkdir(parents=True, exist_ok=True)
    inner = Recorder()
    strategy = AuditingStrategy(
        inner, UpdateAuditor(attacks), _model, LR, batch_size, tmp_path, workers=workers
    )
    strategy.configure_train(1, ArrayRecord(_model().state_dict()), ConfigRecord(), grid=None)
    return strategy, inner


def _rows(folder: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict[str, str]]:
    with open(folder / AUDIT_FILE, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def _grids(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / GRID_FOLDER).iterdir())}


def test_workers_write_the_serial_audits_rows_and_grids_in_order(tmp_path: Path) -> None:
    rounds = {1: [_reply(0, 0), _reply(1, 1, truth=False)], 2: [_reply(0, 2), _reply(1, 3)]}
    for name, workers in (("serial", 0), ("parallel", 2)):
        strategy, inner = _strategy(tmp_path / name, ["analytic-fc", "layerwise"], workers)
        for server_round, replies in rounds.items():
            strategy.aggregate_train(server_round, replies)
        strategy.close()
        assert len(inner.aggregated) == 2
    serial, parallel = _rows(tmp_path / "serial"), _rows(tmp_path / "parallel")
    assert [(r["round"], r["partition_id"], r["attack"]) for r in parallel] == [
        (str(rnd), str(client), attack)
        for rnd in (1, 2)
        for client in (0, 1)
        for attack in ("analytic-fc", "layerwise")
    ]
    assert parallel == serial
    assert float(parallel[0]["psnr"]) >= 60  # a real reconstruction, not two equal failures
    assert _grids(tmp_path / "parallel") == _grids(tmp_path / "serial")
    assert list(_grids(tmp_path / "parallel")) == ["round-0001.png", "round-0002.png"]


@pytest.mark.slow  # several pools: the crash breaks one, each job then in flight reruns in its own
def test_a_worker_that_dies_costs_its_update_an_error_row_and_no_round(tmp_path: Path) -> None:
    strategy, inner = _strategy(tmp_path, [DiesOnBatchTwo(), "analytic-fc"], workers=1, batch_size=8)
    rounds = {1: [_reply(0, 0)], 2: [_reply(0, 1), _reply(1, 2, num_examples=2)], 3: [_reply(0, 3)]}
    for server_round, replies in rounds.items():
        strategy.aggregate_train(server_round, replies)
    strategy.close()
    assert [len(replies) for replies in inner.aggregated] == [1, 2, 1]  # every round aggregated
    rows = _rows(tmp_path)
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


def test_the_queue_is_bounded_and_a_commit_waits_for_its_rounds_audit(tmp_path: Path) -> None:
    strategy, _ = _strategy(tmp_path, [Slow()], workers=1)
    commits: list[tuple[int, int]] = []  # (round, audit rows written when its commit ran)
    for server_round in range(1, 5):
        strategy.aggregate_train(server_round, [_reply(0, server_round)])
        assert strategy.queue is not None and strategy.queue.pending <= MAX_PENDING_ROUNDS
        strategy.after_audits(lambda r=server_round: commits.append((r, len(_rows(tmp_path)))))
        if server_round == 1:
            assert commits == [], "the commit ran before its round was audited"
    strategy.close()
    assert strategy.queue.pending == 0
    assert [r for r, _ in commits] == [1, 2, 3, 4]
    assert all(written >= r for r, written in commits), commits  # each after its own round's row


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
    rows = _rows(parallel)
    assert len(rows) == 2 * 3 * 2 and rows == _rows(serial)
    assert sorted((r["round"], r["partition_id"]) for r in rows) == [
        (str(rnd), str(client)) for rnd in (1, 2) for client in (0, 1, 2) for _ in range(2)
    ]
    assert _grids(parallel) == _grids(serial)

    def metrics(run: Path) -> list[dict[str, str]]:
        with open(run / "metrics.csv", newline="") as handle:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]

    assert metrics(parallel) == metrics(serial)
    assert sorted(p.name for p in (parallel / "checkpoints").iterdir()) == sorted(
        p.name for p in (serial / "checkpoints").iterdir()
    )


def test_workers_refuse_a_model_recipe_they_cannot_receive(tmp_path: Path) -> None:
    """Each worker gets the auditor and the model recipe by pickling; a lambda fails at once."""
    recipe = lambda: _model()  # noqa: E731
    with pytest.raises(TypeError, match="audit workers need a picklable auditor"):
        AuditingStrategy(Recorder(), UpdateAuditor(["layerwise"]), recipe, LR, 1, tmp_path, workers=2)
