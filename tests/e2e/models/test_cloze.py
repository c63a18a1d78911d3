"""The cloze family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.optional import require_fortunes
from tests.support.runs import read_metrics, run_fedsim


@pytest.mark.slow
def test_cloze_learns_in_a_federation(tmp_path: Path) -> None:
    require_fortunes()
    args = ["run", "--name", "cloze", "--model", "cloze", "--dataset", "fortunes"]
    args += ["--model-options", "width=32,layers=1,dropout=0"]
    args += ["--clients", "2", "--rounds", "3", "--max-local-steps", "15", "--batch-size", "32"]
    args += ["--learning-rate", "0.5", "--momentum", "0.9", "--fraction-evaluate", "0", "--cpus", "2"]
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    server = [r for r in read_metrics(tmp_path / "runs" / "cloze") if r["stage"] == "server"]
    losses = [float(r["eval_loss"]) for r in server]
    accuracy = [float(r["eval_accuracy"]) for r in server]
    assert losses[-1] < losses[0] - 1.0, losses
    assert accuracy[-1] > 0.10, accuracy
