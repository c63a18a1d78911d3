"""`fedsim.run` twice in one process, with round callbacks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import fedsim


@pytest.mark.slow
def test_federations_twice_in_one_process_with_round_callbacks(tmp_path: Path) -> None:
    """Three simulations from one interpreter (a notebook's pattern): a straight run, and the same
    config stopped after round 1 and resumed. Callbacks arrive in order, once per round."""
    config = {"clients": 2, "rounds": 2, "local-epochs": 1, "fraction-evaluate": 0.0, "seed": 3}
    seen: dict[str, list[int]] = {"straight": [], "stopped": [], "resumed": []}

    def follow(label: str) -> Callable[[int, dict[str, float]], None]:
        def on_round(server_round: int, metrics: dict[str, float]) -> None:
            assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_loss"] > 0
            seen[label].append(server_round)

        return on_round

    straight = fedsim.run(
        {**config, "name": "straight"}, runs_dir=tmp_path, cpus=2, on_round=follow("straight")
    )
    stopped = fedsim.run(
        {**config, "name": "stopped"}, runs_dir=tmp_path, cpus=2, stop_after=1, on_round=follow("stopped")
    )
    resumed = fedsim.run(resume=tmp_path / "stopped", cpus=2, on_round=follow("resumed"))
    assert seen == {"straight": [0, 1, 2], "stopped": [0, 1], "resumed": [2]}
    assert (straight.rounds_run, stopped.rounds_run, resumed.rounds_run) == (2, 1, 1)

    assert straight.path == tmp_path / "straight" and straight.config.num_clients == 2
    assert list(straight.server["round"]) == [0, 1, 2] and "train_loss" not in straight.server
    assert set(straight.metrics["stage"]) == {"train", "server"}
    assert straight.final["eval_accuracy"] == straight.server["eval_accuracy"].iloc[-1] > 0.5
    assert [p.name for p in straight.checkpoints] == [f"round-000{i}.safetensors" for i in range(3)]
    assert straight.plot_path is not None and straight.plot_path.stat().st_size > 0
    assert straight.audit is None and straight.audit_path is None
    columns = [c for c in straight.metrics.columns if c != "seconds"]
    pd.testing.assert_frame_equal(resumed.metrics[columns], straight.metrics[columns])
    nothing_left = fedsim.run(resume=tmp_path / "stopped")
    assert nothing_left.rounds_run == 0 and nothing_left.last_round == 2
