"""The ulmfit family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.optional import require_fortunes
from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_ulmfit_learns_with_gradual_unfreezing_in_a_federation(tmp_path: Path) -> None:
    # No LM stage here: from a random initialisation two clients' LM round left the classifier
    # stuck at ln 6 for the rest of a short run (measured); the LM stage is for a pretrained LM.
    require_fortunes()
    args = ["run", "--name", "ulm", "--model", "ulmfit", "--dataset", "fortunes"]
    args += ["--model-options", "lm_rounds=0"]
    args += ["--clients", "2", "--rounds", "5", "--local-epochs", "2", "--learning-rate", "0.01"]
    args += ["--fraction-evaluate", "0", "--cpus", "2"]
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ulm"
    server = [float(r["eval_accuracy"]) for r in read_metrics(run) if r["stage"] == "server"]
    # measured: 0.195 after round 1 (classifier only), 0.297 after round 5 (chance 0.167)
    assert final_server_accuracy(run) >= 0.25, server
    assert final_server_accuracy(run) > server[1] + 0.05, f"unfreezing adds nothing: {server}"
