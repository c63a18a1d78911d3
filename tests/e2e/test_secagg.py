"""`fedsim run --secagg` end to end: SecAgg+ federations, the aggregate audited, resumed,
diverging, with drop-outs and with DP-SGD."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.federation.secagg_client import (
    NON_FINITE_UPDATE,
)
from fedsim.plan.secagg import QUANTIZATION_STEP, max_weight
from fedsim.strategy.auditor.aggregate import PER_CLIENT_IMPOSSIBLE
from fedsim.strategy.validation import DIVERGED
from fedsim.training.local import model_for, train_locally
from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim
from tests.support.secagg import audit_rows

SMALL = ["--dataset", "digits", "--model", "mlp", "--clients", "4", "--rounds", "2", "--secagg"]


def _run(args: list[str], cwd: Path) -> None:
    result = run_fedsim(["run", *args], cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


# The tests that read it share one pytest-xdist worker, so it runs once.
SHARES_AUDITED_RUN = pytest.mark.xdist_group("secagg-audited-run")


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One audited SecAgg+ federation, shared by the slow tests that read it."""
    cwd = tmp_path_factory.mktemp("secagg")
    _run(["--name", "straight", *SMALL, "--audit"], cwd)
    return cwd / "runs" / "straight"


def _fedavg_error(run: Path, server_round: int) -> tuple[float, float]:
    """Largest |secagg global − exact FedAvg global| of one round, recomputing each client's
    seeded local training in this process, and the quantisation bound on it."""
    torch.set_num_threads(1)
    config = RunConfig.from_file(run / "config.json")
    before = load_file(run / "checkpoints" / f"round-{server_round - 1:04d}.safetensors")
    after = load_file(run / "checkpoints" / f"round-{server_round:04d}.safetensors")
    trained = [
        int(r["partition_id"])
        for r in read_metrics(run)
        if r["stage"] == "train" and r["round"] == str(server_round)
    ]
    counts, updates = [], []
    for pid in trained:
        model = model_for(config)
        model.load_state_dict(before)
        result = train_locally(model, client_data(config, pid), config, server_round, pid)
        counts.append(result.num_examples)
        updates.append({k: result.weights[k].double() - before[k].double() for k in before})
    n = torch.tensor(counts, dtype=torch.float64)
    worst, largest = 0.0, 0.0
    for name in before:
        exact = before[name].double() + sum(c * u[name] for c, u in zip(n, updates, strict=True)) / n.sum()
        worst = max(worst, float((after[name].double() - exact).abs().max()))
        largest = max(largest, float(exact.abs().max()))
    # n stochastic roundings of one step each, divided by the sum of the weights n_i / max_weight;
    # then the float32 rounding of the new weights.
    bound = len(counts) * QUANTIZATION_STEP / float(n.sum() / max_weight(config))
    return worst, bound + float(np.finfo(np.float32).eps) * largest


@pytest.mark.slow
@SHARES_AUDITED_RUN
def test_secagg_federation_completes_and_audits_only_the_aggregate(audited_run: Path) -> None:
    rows = read_metrics(audited_run)
    assert [r["round"] for r in rows if r["stage"] == "server"] == ["0", "1", "2"]
    assert {(r["round"], r["partition_id"]) for r in rows if r["stage"] == "train"} == {
        (str(rnd), str(pid)) for rnd in (1, 2) for pid in range(4)
    }
    assert sorted(p.name for p in (audited_run / "checkpoints").iterdir()) == [
        f"round-000{i}.safetensors" for i in range(3)
    ]
    assert final_server_accuracy(audited_run) > 0.8
    audit = audit_rows(audited_run)
    assert [r["round"] for r in audit] == ["1", "2"], "one audited update per round: the aggregate"
    for row in audit:
        assert row["partition_id"] == "" and row["batch_size"] == "1296"  # 4 × 324 examples
        assert row["threat"].startswith("SecAgg+ aggregate of 4 clients (b=1296, s=")
        assert row["note"].startswith(PER_CLIENT_IMPOSSIBLE)
    assert (audited_run / "audit" / "round-0002.png").exists()


@pytest.mark.slow
@SHARES_AUDITED_RUN
def test_secagg_aggregate_equals_plain_fedavg_within_the_quantisation_error(audited_run: Path) -> None:
    for server_round in (1, 2):
        error, bound = _fedavg_error(audited_run, server_round)
        assert 0 < error <= bound, (server_round, error, bound)
        assert bound < 1e-5


@pytest.mark.slow
@SHARES_AUDITED_RUN
def test_secagg_resume_matches_the_straight_run(audited_run: Path, tmp_path: Path) -> None:
    _run(["--name", "stopped", *SMALL, "--audit", "--stop-after", "1"], tmp_path)
    stopped = tmp_path / "runs" / "stopped"
    assert not (stopped / "checkpoints" / "round-0002.safetensors").exists()
    _run(["--resume", str(stopped)], tmp_path)
    for server_round in (1, 2):
        name = f"round-{server_round:04d}.safetensors"
        straight, resumed = (
            load_file(audited_run / "checkpoints" / name),
            load_file(stopped / "checkpoints" / name),
        )
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name

    def timeless(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert timeless(read_metrics(stopped)) == timeless(read_metrics(audited_run))
    assert [r["threat"] for r in audit_rows(stopped)] == [r["threat"] for r in audit_rows(audited_run)]


@pytest.mark.slow
def test_a_diverging_secagg_run_stops_before_the_sum_reaches_the_model(tmp_path: Path) -> None:
    result = run_fedsim(["run", "--name", "diverged", *SMALL, "--learning-rate", "1e6"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.rstrip("\n").splitlines()[-1]
    assert error.startswith(
        "error: the simulation stopped after round 0 of 2 (round 1: secure aggregation stopped at its "
        f"collect-masked-vectors stage (0 of 4 sampled clients still answering, reconstruction threshold 2); "
        f"first client error: {NON_FINITE_UPDATE} in "
    )
    assert DIVERGED in error
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "diverged" / "checkpoints").iterdir())
    assert checkpoints == ["round-0000.safetensors"]


DROPOUT_RUN = """
import sys
from pathlib import Path

from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedsim.config.run_config import RunConfig
from fedsim.federation.secagg_client import _client_fn
from fedsim.plan.federation_plan import FederationPlan
from fedsim.federation.simulation import simulate
from fedsim.store.run_store import RunStore
from fedsim.training.local import metric_names


def fail_client_1(msg, context, call_next):
    # Reached only at SecAgg+'s collect stage, after key sharing: client 1 drops out mid-protocol.
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("client 1 lost its connection")
    return call_next(msg, context)


config = RunConfig(name="dropout", num_clients=4, rounds=2, secagg=True)
plan = FederationPlan(config, RunStore.create(Path(sys.argv[1]), config, metric_names(config)))
simulate(plan, cpus=2, client_app=ClientApp(client_fn=_client_fn, mods=[secaggplus_mod, fail_client_1]))
"""


@pytest.mark.slow
def test_secagg_recovers_a_client_that_drops_out_and_sums_the_others(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DROPOUT_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for rnd in (1, 2):
        assert (
            f"round {rnd}: 1 of 4 clients failed during secure aggregation; the sum holds the others "
            "(first error: client 1 lost its connection)"
        ) in result.stderr
    run = tmp_path / "dropout"
    trained = {(r["round"], r["partition_id"]) for r in read_metrics(run) if r["stage"] == "train"}
    assert trained == {(str(rnd), str(pid)) for rnd in (1, 2) for pid in (0, 2, 3)}
    error, bound = _fedavg_error(run, 1)
    assert 0 < error <= bound, (error, bound)


@pytest.mark.slow
def test_dp_sgd_under_secagg_keeps_its_ledger_across_a_resume(tmp_path: Path) -> None:
    """Clients report their DP-SGD spend in clear beside the masked update; the server's ledger
    composes it (Opacus RDP) and checkpoints its history, so the resumed round 2 is cumulative."""
    args = ["--name", "private", "--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "2",
            "--local-epochs", "1", "--batch-size", "32", "--secagg", "--defence", "dp-sgd"]  # fmt: skip
    _run([*args, "--stop-after", "1"], tmp_path)
    run = tmp_path / "runs" / "private"
    _run(["--resume", str(run)], tmp_path)
    with open(run / "privacy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["round"], r["partition_id"]) for r in rows] == [
        (str(n), str(p)) for n in (1, 2) for p in range(3)
    ]
    config = RunConfig.from_file(run / "config.json")
    for row in rows:
        batches = math.ceil(len(client_data(config, int(row["partition_id"])).y_train) / 32)
        accountant = RDPAccountant()
        accountant.history = [(1.0, 1 / batches, batches)] * int(row["round"])
        assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    server = [r for r in read_metrics(run) if r["stage"] == "server"]
    assert float(server[-1]["epsilon_client_max"]) == max(
        float(r["epsilon"]) for r in rows if r["round"] == "2"
    )
