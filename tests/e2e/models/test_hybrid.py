"""The hybrid family in a federation, end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.support.runs import final_server_accuracy, run_fedsim


@pytest.mark.slow
def test_hybrid_sc_learns_long_tailed_fashion_mnist_in_a_federation(workdir: Path) -> None:
    args = [
        "run", "--name", "hybrid", "--dataset", "fashion-mnist", "--partitioner", "longtail",
        "--imbalance-ratio", "10", "--model", "hybrid-sc", "--model-options", "width=8",
        "--clients", "2", "--rounds", "3", "--local-epochs", "1", "--max-local-steps", "15",
        "--batch-size", "64", "--learning-rate", "0.05", "--audit", "--audit-attacks", "layerwise",
        "--audit-clients", "1",
    ]  # fmt: skip
    done = run_fedsim(args, workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final_server_accuracy(workdir / "runs" / "hybrid") > 0.4  # 0.52 measured (seeded); chance 0.1
    with open(workdir / "runs" / "hybrid" / "audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(r["status"] == "declined" and r["note"] for r in rows)  # with reasons
