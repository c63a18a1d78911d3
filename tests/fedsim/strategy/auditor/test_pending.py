"""The audit in worker processes (`audit-workers` > 0): the same rows and grids as the serial
audit, in order, with a bounded queue, checkpoints after their round's audit, and a worker that
dies costing its update an error row, never a round."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from audits.scoring.engine import UpdateAuditor
from fedsim.strategy.auditor.pending import MAX_PENDING_ROUNDS
from fedsim.strategy.auditor.strategy import AuditingStrategy
from fedsim.training.client_step import ClientTraining
from models import TrainingSettings
from tests.support.audit_workers import audit_rows_of, auditing_strategy_for, grid_bytes_of
from tests.support.audited_replies import LR, PLAIN_SGD, Recorder, digits_mlp, train_reply_of


class Slow:
    """Takes its time, so rounds queue up behind it."""

    name = "slow"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        time.sleep(0.5)
        raise AttackError("slow on purpose")


def test_workers_write_the_serial_audits_rows_and_grids_in_order(tmp_path: Path) -> None:
    rounds = {
        1: [train_reply_of(0, 0), train_reply_of(1, 1, truth=False)],
        2: [train_reply_of(0, 2), train_reply_of(1, 3)],
    }
    for name, workers in (("serial", 0), ("parallel", 2)):
        strategy, inner = auditing_strategy_for(tmp_path / name, ["analytic-fc", "layerwise"], workers)
        for server_round, replies in rounds.items():
            strategy.aggregate_train(server_round, replies)
        strategy.close()
        assert len(inner.aggregated) == 2
    serial, parallel = audit_rows_of(tmp_path / "serial"), audit_rows_of(tmp_path / "parallel")
    assert [(r["round"], r["partition_id"], r["attack"]) for r in parallel] == [
        (str(rnd), str(client), attack)
        for rnd in (1, 2)
        for client in (0, 1)
        for attack in ("analytic-fc", "layerwise")
    ]
    assert parallel == serial
    assert float(parallel[0]["psnr"]) >= 60  # a real reconstruction, not two equal failures
    assert grid_bytes_of(tmp_path / "parallel") == grid_bytes_of(tmp_path / "serial")
    assert list(grid_bytes_of(tmp_path / "parallel")) == ["round-0001.png", "round-0002.png"]


def test_the_queue_is_bounded_and_a_commit_waits_for_its_rounds_audit(tmp_path: Path) -> None:
    strategy, _ = auditing_strategy_for(tmp_path, [Slow()], workers=1)
    commits: list[tuple[int, int]] = []  # (round, audit rows written when its commit ran)
    for server_round in range(1, 5):
        strategy.aggregate_train(server_round, [train_reply_of(0, server_round)])
        assert strategy.queue is not None and strategy.queue.pending <= MAX_PENDING_ROUNDS
        strategy.after_audits(lambda r=server_round: commits.append((r, len(audit_rows_of(tmp_path)))))
        if server_round == 1:
            assert commits == [], "the commit ran before its round was audited"
    strategy.close()
    assert strategy.queue.pending == 0
    assert [r for r, _ in commits] == [1, 2, 3, 4]
    assert all(written >= r for r, written in commits), commits  # each after its own round's row


def test_workers_refuse_a_model_recipe_they_cannot_receive(tmp_path: Path) -> None:
    """Each worker gets the auditor and the model recipe by pickling; a lambda fails at once."""
    recipe = lambda: digits_mlp()  # noqa: E731
    with pytest.raises(TypeError, match="audit workers need a picklable auditor"):
        AuditingStrategy(Recorder(), UpdateAuditor(["layerwise"]), recipe, PLAIN_SGD, 1, tmp_path, workers=2)


def test_workers_read_the_rounds_client_step_as_the_serial_audit_does(tmp_path: Path) -> None:
    """Momentum over two steps: a worker's rows carry the same approximation note as the serial
    audit's, so the client step reached it."""
    training = ClientTraining(TrainingSettings(LR, momentum=0.9))
    for name, workers in (("serial", 0), ("parallel", 1)):
        folder = tmp_path / name
        folder.mkdir()
        strategy = AuditingStrategy(
            Recorder(), UpdateAuditor(["analytic-fc"]), digits_mlp, training, 1, folder, workers=workers
        )
        strategy.configure_train(1, ArrayRecord(digits_mlp().state_dict()), ConfigRecord(), grid=None)
        strategy.aggregate_train(1, [train_reply_of(0, 0, local_steps=2)])
        strategy.close()
    serial, parallel = audit_rows_of(tmp_path / "serial"), audit_rows_of(tmp_path / "parallel")
    assert parallel == serial and "SGD momentum 0.9" in parallel[0]["note"]
