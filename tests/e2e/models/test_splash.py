"""The splash family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runs import final_server_accuracy, run_fedsim


@pytest.mark.slow
def test_fedavg_learns_splash_and_the_audited_run_completes(tmp_path: Path) -> None:
    args = [
        "run", "--name", "splash", "--model", "splash-fnn", "--dataset", "splash",
        "--clients", "3", "--rounds", "3", "--local-epochs", "1", "--max-local-steps", "30",
        "--learning-rate", "0.01", "--audit", "--audit-clients", "1",
    ]  # fmt: skip
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "splash"
    assert final_server_accuracy(run) >= 0.93
    assert (run / "audit.csv").exists()
