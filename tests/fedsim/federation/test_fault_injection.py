"""Faulty clients among honest ones: every fault is refused or survived, logged in faults.csv
with its reason, never reaches the global model or the auditor, and the run completes.

The harness (`fedsim/federation/fault_injection.py`) injects the faults; the fast tests here feed its
corrupted replies to the validation step, the slow one runs a whole federation with it.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError
from fedsim.federation.fault_injection import (
    DEMO_FAULTS,
    SCALE,
    corrupt,
    fault_for,
    injected,
    parse_spec,
)
from fedsim.federation.straggler_grid import StragglerDeadlineGrid
from fedsim.store.fault_log import FAILED, FAULT_COLUMNS, FAULTS_FILE, NO_REPLY, REJECTED, FaultLog, FaultRow
from fedsim.strategy.validation import ValidatingStrategy
from tests.support.flower_messages import StaticGrid, act_as_server, arrays, train_reply

GLOBAL = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.zeros(2, dtype=np.float32)}
HONEST = [0.1, 0.2, 0.3]  # the honest clients' step in every coordinate


@pytest.fixture(autouse=True)
def _server(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)


def moved(step: float) -> dict[str, np.ndarray]:
    return {name: value + np.float32(step) for name, value in GLOBAL.items()}


def validated_round(replies: list[Message], asked: int = 4) -> tuple[dict[str, np.ndarray], list[FaultRow]]:
    """One round through validation at the default settings, `asked` nodes (100, 101, ...)
    sampled; the aggregate and the fault rows."""
    faults: list[FaultRow] = []
    fedavg = FedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy = ValidatingStrategy(fedavg, RunConfig().reject_norm_ratio, on_faults=faults.extend)
    grid = StaticGrid([100 + pid for pid in range(asked)])
    list(strategy.configure_train(1, arrays(GLOBAL), wire.run_config_record(RunConfig()), grid))
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    return {name: array.numpy() for name, array in aggregated.items()}, faults


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "non-finite weights in 'w'"),
        ("inf", "non-finite weights in 'w'"),
        ("shape", "array 'w' has shape (2, 2), the model's is (3, 2)"),
        ("dtype", "array 'w' has dtype float64, the model's is float32"),
        ("scale", "exceeds 1000 × the round's median"),
    ],
)
def test_each_garbage_fault_is_rejected_by_default_and_logged(kind: str, reason: str) -> None:
    bad = corrupt(kind, moved(0.4), GLOBAL)
    replies = [train_reply(pid, moved(step)) for pid, step in enumerate(HONEST)] + [train_reply(3, bad)]
    aggregated, faults = validated_round(replies)
    assert [(f.round, f.stage, f.partition_id, f.node_id, f.kind) for f in faults] == [
        (1, "train", 3, 103, REJECTED)
    ]
    assert reason in faults[0].reason
    # The global model is the honest clients' mean, untouched by the fault.
    for name, value in aggregated.items():
        assert np.allclose(value, GLOBAL[name] + np.mean(HONEST)), name


def test_a_scaled_update_is_what_it_claims() -> None:
    delta = corrupt("scale", moved(0.4), GLOBAL)["w"] - GLOBAL["w"]
    assert np.allclose(delta, 0.4 * SCALE, rtol=1e-3)


def test_a_crashed_and_a_silent_client_are_logged_and_the_round_goes_on() -> None:
    crashed = Message(Error(0, "injected fault: the client crashed mid-train"),
                      reply_to=Message(RecordDict(), dst_node_id=102, message_type="train"))  # fmt: skip
    replies = [train_reply(0, moved(0.1)), train_reply(1, moved(0.3)), crashed]
    aggregated, faults = validated_round(replies)  # node 103 never answers
    assert [(f.partition_id, f.node_id, f.kind, f.reason) for f in faults] == [
        (None, 102, FAILED, "injected fault: the client crashed mid-train"),
        (None, 103, NO_REPLY, "no reply within round-timeout"),
    ]
    assert np.allclose(aggregated["b"], 0.2)


def test_a_round_nobody_answered_stops_the_run() -> None:
    with pytest.raises(RunFailedError, match="none of the 4 sampled clients replied within round-timeout"):
        validated_round([])


def test_resume_drops_the_faults_of_an_interrupted_round(tmp_path: Path) -> None:
    log = FaultLog(tmp_path)
    log.record([FaultRow(r, "train", 1, 7, REJECTED, "non-finite weights in 'w'") for r in (1, 2, 3)])
    log.drop_rounds_after(2)
    with open(tmp_path / FAULTS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["round"] for row in rows] == ["1", "2"] and tuple(rows[0]) == FAULT_COLUMNS


def test_the_fault_plan_picks_a_node_config_first_then_the_test_spec() -> None:
    plan = parse_spec("3=nan@1, 3=raise, 4=dropout@2")
    assert plan == {3: {1: "nan", 0: "raise"}, 4: {2: "dropout"}}
    assert fault_for(plan, {"partition-id": 3}, 1) == "nan"
    assert fault_for(plan, {"partition-id": 3}, 2) == "raise"
    assert fault_for(plan, {"partition-id": 4}, 1) is None
    assert fault_for(plan, {"partition-id": 4, "fault": "inf@1"}, 1) == "inf"
    assert fault_for(plan, {"partition-id": 0}, 1) is None
    assert injected(plan, rounds=3) == 5 and injected(parse_spec(DEMO_FAULTS), rounds=3) == 9
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        parse_spec("1=melt")


class TimedGrid:
    """A Grid whose replies to `push_messages` arrive after fixed delays (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.sent = 0.0

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.sent = time.monotonic()
        self.messages = {str(m.metadata.dst_node_id): m for m in messages}
        return list(self.messages)

    def pull_messages(self, ids: set[str]) -> list[Message]:
        elapsed = time.monotonic() - self.sent
        ready = []
        for message_id in ids:
            delay = self.delays[int(message_id)]
            if delay is not None and elapsed >= delay:
                reply = train_reply(int(message_id) - 100, moved(0.1))
                reply.metadata.__dict__["_reply_to_message_id"] = message_id  # what pull matches on
                ready.append(reply)
        return ready


def test_round_timeout_counts_from_the_first_reply() -> None:
    """A slow start (1 s) costs nothing; a silent node costs `after_first` (0.5 s) after it."""
    grid = TimedGrid({100: 1.0, 101: 1.2, 102: None})
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (100, 101, 102)]
    started = time.monotonic()
    replies = StragglerDeadlineGrid(grid, after_first=0.5, pull_interval=0.02).send_and_receive(
        messages, timeout=60
    )
    waited = time.monotonic() - started
    assert sorted(r.metadata.src_node_id for r in replies) == [100, 101]
    assert 1.4 <= waited < 10, waited  # not cut at 0.5 s from the send, nor the 60 s timeout
