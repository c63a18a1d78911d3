"""A federation of a model that sends part of itself: checkpoints hold the federated readout only."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_random_features_learn_in_a_federation_whose_checkpoints_hold_the_readout_only(
    tmp_path: Path,
) -> None:
    args = ["run", "--name", "rf", "--model", "random-features", "--clients", "2", "--rounds", "2"]
    args += ["--learning-rate", "0.1", "--fraction-evaluate", "0", "--cpus", "2"]
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "rf"
    # measured: 0.10 at round 0, 0.86 after round 1, 0.93 after round 2 (digits, 10 classes)
    assert final_server_accuracy(run) >= 0.85, [r for r in read_metrics(run) if r["stage"] == "server"]
    for server_round in range(3):
        saved = load_file(run / "checkpoints" / f"round-{server_round:04d}.safetensors")
        assert sorted(saved) == ["readout.bias", "readout.weight"]
        assert saved["readout.weight"].shape == (10, 512)
