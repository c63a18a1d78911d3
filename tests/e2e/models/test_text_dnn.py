"""The text-dnn family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.optional import require_fortunes
from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_text_dnn_pretrains_then_learns_in_a_federation(tmp_path: Path) -> None:
    require_fortunes()
    args = ["run", "--name", "dnn", "--model", "text-dnn", "--dataset", "fortunes-lsa"]
    args += ["--model-options", "widths=64-32,pretrain_rounds_per_layer=1"]
    args += ["--clients", "3", "--rounds", "6", "--learning-rate", "0.01", "--momentum", "0.9"]
    args += ["--fraction-evaluate", "0", "--cpus", "2"]
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "dnn"
    server = [float(r["eval_accuracy"]) for r in read_metrics(run) if r["stage"] == "server"]
    assert final_server_accuracy(run) >= 0.30, server
    assert final_server_accuracy(run) > max(server[:3]) + 0.05, f"fine-tuning adds nothing: {server}"
