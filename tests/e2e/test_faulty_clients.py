"""A federation with faulty clients completes, every fault logged, no round lost."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedsim.federation.fault_injection import (
    run_driver,
)
from fedsim.store.fault_log import FAILED, FAULTS_FILE, NO_REPLY, REJECTED
from tests.support.runs import final_server_accuracy, read_metrics

# What faults.csv must say of DEMO_FAULTS: (round, partition) → (kind, part of the reason).
EXPECTED = {
    (1, 3): (REJECTED, "non-finite weights in "),
    (1, 4): (REJECTED, "non-finite weights in "),
    (1, 5): (REJECTED, "exceeds 1000 × the round's median"),
    (2, 3): (REJECTED, "has shape"),
    (2, 4): (NO_REPLY, "no reply within round-timeout"),
    (2, 5): (NO_REPLY, "no reply within round-timeout"),
    (3, 3): (FAILED, "injected fault: the client crashed mid-train"),
    (3, 4): (REJECTED, "has dtype float64, the model's is float32"),
    (3, 5): (REJECTED, "exceeds 1000 × the round's median"),
}


@pytest.mark.slow
def test_a_federation_with_faulty_clients_completes_with_every_fault_logged(tmp_path: Path) -> None:
    result = run_driver(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "faulty"
    assert [int(r["round"]) for r in read_metrics(run) if r["stage"] == "server"] == [0, 1, 2, 3]

    with open(run / FAULTS_FILE, newline="") as handle:
        faults = list(csv.DictReader(handle))
    logged = {(int(f["round"]), int(f["partition_id"])): (f["kind"], f["reason"]) for f in faults}
    assert len(logged) == len(faults) == len(EXPECTED), faults
    assert all(f["stage"] == "train" for f in faults), faults
    for key, (kind, reason) in EXPECTED.items():
        assert logged[key][0] == kind and reason in logged[key][1], (key, logged.get(key))

    checkpoints = sorted((run / "checkpoints").glob("round-????.safetensors"))
    assert [p.name for p in checkpoints] == [f"round-000{i}.safetensors" for i in range(4)]
    for checkpoint in checkpoints:
        assert all(t.isfinite().all() for t in load_file(checkpoint).values()), checkpoint.name
    assert final_server_accuracy(run) > 0.8

    with open(run / "audit.csv", newline="") as handle:
        audited = {(int(r["round"]), int(r["partition_id"])) for r in csv.DictReader(handle)}
    honest = {(rnd, pid) for rnd in (1, 2, 3) for pid in (0, 1, 2)}
    assert honest <= audited, "the auditor skipped honest clients"
    assert not audited & set(EXPECTED), f"the auditor attacked rejected updates: {audited & set(EXPECTED)}"
