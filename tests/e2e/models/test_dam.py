"""The dam family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_dam_mlp_prunes_while_it_learns_in_a_federation(tmp_path: Path) -> None:
    args = ["run", "--name", "dam", "--model", "dam-mlp", "--model-options", "lam=0.3,cold_rounds=1"]
    args += ["--clients", "3", "--rounds", "3", "--fraction-evaluate", "0", "--cpus", "2"]
    args += ["--audit", "--audit-clients", "1", "--audit-attacks", "layerwise"]
    result = run_fedsim(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "dam"
    assert final_server_accuracy(run) >= 0.85
    server = [r for r in read_metrics(run) if r["stage"] == "server"]
    widths = [(float(r["eval_width_1"]), float(r["eval_width_2"])) for r in server]
    assert widths[0] == widths[1] == (256, 256), "no unit closes before or during the cold-start round"
    assert sum(widths[-1]) <= 0.8 * 512, f"too little pruned: {widths}"
    assert (run / "audit.csv").stat().st_size > 0
