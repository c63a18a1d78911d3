"""An MLP federates on feature vectors end to end."""

from __future__ import annotations

import pytest

from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_an_mlp_federates_on_feature_vectors(tmp_path) -> None:
    args = ["--dataset", "breast-cancer", "--model", "mlp", "--clients", "5", "--rounds", "3"]
    result = run_fedsim(
        ["run", "--name", "bc", *args, "--batch-size", "8", "--learning-rate", "0.05"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "bc"
    server = [r for r in read_metrics(run) if r["stage"] == "server"]
    assert float(server[-1]["eval_loss"]) < float(server[0]["eval_loss"])
    assert final_server_accuracy(run) >= 0.9  # a linear model reaches about 0.95 on this split
