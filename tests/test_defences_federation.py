"""Defences end to end: whole federations in their own `fedsim` processes, on real data."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from tests.conftest import read_metrics, run_fedsim
from tests.test_central_dp import flower_epsilon

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> None:
    result = run_fedsim(["run", *args], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


CENTRAL = ["--clients", "4", "--rounds", "3", "--local-epochs", "1", "--seed", "2",
           "--central-dp", "server", "--noise-multiplier", "0.7", "--clipping-norm", "2"]  # fmt: skip


def test_central_dp_epsilon_and_weights_survive_a_resume(tmp_path: Path) -> None:
    _run(["--name", "straight", *CENTRAL], tmp_path)
    _run(["--name", "halted", *CENTRAL, "--stop-after", "2"], tmp_path)
    runs = tmp_path / "runs"
    _run(["--resume", str(runs / "halted")], tmp_path)

    config = RunConfig(num_clients=4, noise_multiplier=0.7)
    straight = _rows(runs / "straight" / "privacy.csv")
    assert [float(r["epsilon"]) for r in straight] == pytest.approx(
        [flower_epsilon(config, n) for n in (1, 2, 3)], rel=1e-12
    )
    assert _rows(runs / "halted" / "privacy.csv") == straight
    final = "checkpoints/round-0003.safetensors"
    assert _same_weights(runs / "straight" / final, runs / "halted" / final)
    server = [r for r in read_metrics(runs / "halted") if r["stage"] == "server"]
    assert [r["epsilon_central"] for r in server[1:]] == [r["epsilon"] for r in straight]


DP_SGD = ["--clients", "3", "--rounds", "3", "--local-epochs", "1", "--batch-size", "16", "--seed", "5",
          "--defence", "dp-sgd", "--noise-multiplier", "1.1", "--max-grad-norm", "1"]  # fmt: skip


def test_dp_sgd_epsilon_is_opacus_own_and_survives_a_resume(tmp_path: Path) -> None:
    _run(["--name", "straight", *DP_SGD], tmp_path)
    _run(["--name", "halted", *DP_SGD, "--stop-after", "1"], tmp_path)
    runs = tmp_path / "runs"
    _run(["--resume", str(runs / "halted")], tmp_path)

    straight = _rows(runs / "straight" / "privacy.csv")
    assert _rows(runs / "halted" / "privacy.csv") == straight
    final = "checkpoints/round-0003.safetensors"
    assert _same_weights(runs / "straight" / final, runs / "halted" / final)

    # Recomputed here: Opacus's RDP accountant over each client's rounds, q = 1 / batches per epoch.
    config = RunConfig(num_clients=3, local_epochs=1, batch_size=16, seed=5)
    for row in straight:
        size = len(client_data(config, int(row["partition_id"])).y_train)
        batches = math.ceil(size / 16)
        accountant = RDPAccountant()
        accountant.history = [(1.1, 1 / batches, batches)] * int(row["round"])
        assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert (row["sampling"], int(row["steps"])) == ("poisson", batches)
    server = [r for r in read_metrics(runs / "straight") if r["stage"] == "server"]
    assert float(server[-1]["epsilon_client_max"]) == max(float(r["epsilon"]) for r in straight)
