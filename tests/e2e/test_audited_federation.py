"""A FedSGD federation with the auditor reconstructs the clients' updates."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.support.runs import run_fedsim


@pytest.mark.slow
def test_federation_with_auditor_reconstructs_fedsgd_updates(tmp_path: Path) -> None:
    """CNN6 clients doing FedSGD with batch 1: the server recovers each client's photo."""
    result = run_fedsim(
        ["run", "--name", "audited", "--dataset", "photos", "--model", "cnn6", "--clients", "3",
         "--rounds", "2", "--batch-size", "1", "--max-local-steps", "1", "--learning-rate", "0.1",
         "--momentum", "0", "--fraction-evaluate", "0",
         "--audit", "--audit-attacks", "layerwise", "--audit-clients", "0"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "audited"
    with open(run / "audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["round"], r["partition_id"]) for r in rows} == {
        (str(a), str(b)) for a in (1, 2) for b in range(3)
    }
    assert all(float(r["psnr"]) >= 40 and r["label_score"] == "1.0" for r in rows), rows
    assert all(float(r["rank_score"]) == 0 and r["threat"].startswith("fedsgd-b1") for r in rows)
    assert {(r["status"], r["batch_size"], r["note"]) for r in rows} == {("reconstructed", "1", "")}
    assert sorted(p.name for p in (run / "audit").iterdir()) == ["round-0001.png", "round-0002.png"]
