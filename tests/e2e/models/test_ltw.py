"""The ltw family in a federation, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.store.audit_folder import load_weights
from models import InputSpec, build_model
from models.learning_to_weight import (
    contingency_counts,
    macro_f1,
)
from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_ltw_learns_in_a_federation_on_summed_counts(tmp_path: Path) -> None:
    args = ["run", "--name", "ltw", "--model", "ltw", "--dataset", "fortunes", "--batch-size", "32"]
    args += ["--clients", "3", "--rounds", "2", "--fraction-evaluate", "0", "--cpus", "2"]
    result = run_fedsim(args, cwd=tmp_path)
    if "fortunes" in result.stderr and "apt-get install" in result.stderr:
        pytest.skip("the fortunes corpus is not installed: apt-get install -y fortunes")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ltw"
    assert final_server_accuracy(run) >= 0.45  # measured 0.54; chance is 1/6
    server = [r for r in read_metrics(run) if r["stage"] == "server"]
    f1 = macro_f1(
        {k.removeprefix("eval_"): float(v) for k, v in server[-1].items() if k.startswith("eval_")}, 6
    )
    assert f1 >= 0.4
    config = RunConfig.from_mapping(json.loads((run / "config.json").read_text()))
    parts = [client_data(config, i) for i in range(3)]
    pooled = contingency_counts(
        torch.cat([p.x_train for p in parts]), torch.cat([p.y_train for p in parts]), 5000, 6
    )
    for checkpoint in sorted((run / "checkpoints").iterdir())[1:]:
        model = build_model("ltw", InputSpec.tokens(48, 5000, 6))
        load_weights(model, checkpoint)
        assert torch.equal(model.term_class_df, pooled[0]) and torch.equal(model.class_docs, pooled[1])
