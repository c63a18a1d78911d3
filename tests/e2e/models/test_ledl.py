"""The ledl family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_ledl_learns_in_a_federation(tmp_path: Path) -> None:
    args = ["run", "--name", "ledl", "--model", "ledl", "--clients", "3", "--rounds", "2"]
    args += ["--fraction-evaluate", "0", "--cpus", "2"]
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ledl"
    server = [float(r["eval_accuracy"]) for r in read_metrics(run) if r["stage"] == "server"]
    assert server[0] < 0.3, "the untrained dictionary should be near chance"
    assert final_server_accuracy(run) >= 0.85
