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
from tests.support.runs import read_metrics, run_fedsim
from tests.support.strategies import flower_epsilon

# One worker under pytest-xdist runs both tests, so the shared federations run once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("private-runs")]


def _run(args: list[str], cwd: Path) -> None:
    result = run_fedsim(["run", *args], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


# DP-SGD on the clients and central DP on the server in one federation: each mechanism's ε is
# recomputed from its own accountant, and both (and the weights) must survive a resume. One run of
# each kind serves both tests: a federation costs far more to start than these rounds to train.
PRIVATE = ["--clients", "4", "--rounds", "3", "--local-epochs", "1", "--batch-size", "16", "--seed", "2",
           "--central-dp", "server", "--noise-multiplier", "0.7", "--clipping-norm", "2",
           "--defence", "dp-sgd", "--max-grad-norm", "1"]  # fmt: skip
FINAL = "checkpoints/round-0003.safetensors"


@pytest.fixture(scope="module")
def private_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`straight` runs all 3 rounds; `halted` stops after round 1 and is resumed."""
    cwd = tmp_path_factory.mktemp("private")
    _run(["--name", "straight", *PRIVATE], cwd)
    _run(["--name", "halted", *PRIVATE, "--stop-after", "1"], cwd)
    runs = cwd / "runs"
    assert not (runs / "halted" / "checkpoints" / "round-0002.safetensors").exists(), "did not halt"
    _run(["--resume", str(runs / "halted")], cwd)
    return runs


def _privacy_rows(run: Path, central: bool) -> list[dict[str, str]]:
    rows = _rows(run / "privacy.csv")
    return [r for r in rows if r["mechanism"].startswith("central-dp") == central]


def test_central_dp_epsilon_and_weights_survive_a_resume(private_runs: Path) -> None:
    config = RunConfig(num_clients=4, noise_multiplier=0.7)
    straight = _privacy_rows(private_runs / "straight", central=True)
    assert [(r["round"], r["mechanism"]) for r in straight] == [
        (str(n), "central-dp(server)") for n in (1, 2, 3)
    ]
    assert [float(r["epsilon"]) for r in straight] == pytest.approx(
        [flower_epsilon(config, n) for n in (1, 2, 3)], rel=1e-12
    )
    assert _privacy_rows(private_runs / "halted", central=True) == straight
    assert _same_weights(private_runs / "straight" / FINAL, private_runs / "halted" / FINAL)
    server = [r for r in read_metrics(private_runs / "halted") if r["stage"] == "server"]
    assert [r["epsilon_central"] for r in server[1:]] == [r["epsilon"] for r in straight]


def test_dp_sgd_epsilon_is_opacus_own_and_survives_a_resume(private_runs: Path) -> None:
    straight = _privacy_rows(private_runs / "straight", central=False)
    assert [(r["round"], r["partition_id"]) for r in straight] == [
        (str(n), str(p)) for n in (1, 2, 3) for p in range(4)
    ]
    assert _privacy_rows(private_runs / "halted", central=False) == straight
    assert _same_weights(private_runs / "straight" / FINAL, private_runs / "halted" / FINAL)

    # Recomputed here: Opacus's RDP accountant over each client's rounds, q = 1 / batches per epoch.
    config = RunConfig(num_clients=4, local_epochs=1, batch_size=16, seed=2)
    for row in straight:
        size = len(client_data(config, int(row["partition_id"])).y_train)
        batches = math.ceil(size / 16)
        accountant = RDPAccountant()
        accountant.history = [(0.7, 1 / batches, batches)] * int(row["round"])
        assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert (row["mechanism"], row["sampling"], int(row["steps"])) == ("dp-sgd", "poisson", batches)
    server = [r for r in read_metrics(private_runs / "straight") if r["stage"] == "server"]
    assert float(server[-1]["epsilon_client_max"]) == max(float(r["epsilon"]) for r in straight)
