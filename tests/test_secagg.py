"""`fedsim run --secagg`: Flower's SecAgg+ as a run mode, the aggregate audited and validated.

Fast tests cover the plan-time refusals, the client's refusal of unmaskable updates, message
routing, the legacy strategy's aggregation and the aggregate auditor; slow ones run SecAgg+
federations (each in its own process) and check the aggregate against plain FedAvg.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedsim.cli import cli
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.errors import RunFailedError
from fedsim.federation import wire
from fedsim.federation.secagg_client import (
    NON_FINITE_UPDATE,
    UnmaskableUpdateError,
    check_maskable,
    is_secagg_message,
)
from fedsim.federation.secagg_plan import QUANTIZATION_STEP, check_secagg, max_weight
from fedsim.federation.secagg_server import CheckedSecAggPlusWorkflow
from fedsim.strategy.aggregate_audit import PER_CLIENT_IMPOSSIBLE, AggregateAuditor
from fedsim.strategy.secagg_fedavg import AggregateRound, ClientResult, SecAggFedAvg
from fedsim.strategy.validation import DIVERGED
from fedsim.training.local import model_for, train_locally
from tests.conftest import final_server_accuracy, read_metrics, run_fedsim
from tests.flower_messages import StaticGrid, act_as_server

BAD_COMBINATIONS = [
    (["--strategy", "krum"], "--secagg needs --strategy fedavg (got krum)"),
    (["--strategy", "fedadam"], "--secagg needs --strategy fedavg (got fedadam)"),
    (["--central-dp", "server"], "--secagg and --central-dp server are not combined yet; drop one of them"),
    (["--central-dp", "client"], "--secagg and --central-dp client are not combined yet"),
    (["--reject-norm-ratio", "10"], "--reject-norm-ratio cannot work with --secagg: the server never sees"),
    (["--clients", "1"], "--secagg needs at least 2 clients per round (got 1)"),
    (["--clients", "4", "--fraction-train", "0.25"], "--secagg needs at least 2 clients per round (got 1)"),
    (["--clients", "1100"], "--secagg sums at most 1023 clients per round (got 1100)"),
    (["--clients", "4", "--secagg-shares", "5"], "secagg-shares 5 exceeds the 4 clients sampled per round"),
    (["--clients", "6", "--secagg-shares", "4"], "secagg-shares 4 must be odd or equal to the 6 clients"),
    (["--secagg-shares", "3", "--secagg-threshold", "3"], "secagg-threshold 3 must be below secagg-shares 3"),
    (["--secagg-shares", "5", "--secagg-threshold", "7"], "secagg-threshold 7 must be below secagg-shares 5"),
    (["--secagg-shares", "2"], "secagg-shares must be at least 3 (got 2)"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_COMBINATIONS, ids=[" ".join(a) for a, _ in BAD_COMBINATIONS]
)
def test_bad_secagg_combination_is_one_line_exit_2_nothing_written(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(cli, ["run", "--runs-dir", str(tmp_path / "runs"), "--secagg", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_secagg_checks_apply_only_to_secagg_runs() -> None:
    check_secagg(RunConfig(strategy="krum", reject_norm_ratio=10.0, num_clients=1, secagg_threshold=9))
    check_secagg(
        RunConfig(secagg=True, num_clients=4, secagg_shares=4, secagg_threshold=3)
    )  # shares = sample


def test_client_refuses_updates_the_quantiser_would_corrupt() -> None:
    with pytest.raises(UnmaskableUpdateError, match=NON_FINITE_UPDATE):
        check_maskable({"w": np.array([0.1, np.nan])}, weight=1.0)
    with pytest.raises(UnmaskableUpdateError, match=r"exceeds SecAgg\+'s quantisation range ±8"):
        check_maskable({"w": np.array([0.1, -9.0])}, weight=1.0)
    check_maskable({"w": np.array([0.1, -9.0])}, weight=0.5)  # the quantiser sees weight · Δ = -4.5


def test_only_secagg_and_legacy_evaluate_messages_are_routed_to_the_legacy_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    act_as_server(monkeypatch)

    def message(kind: str, record: str) -> Message:
        return Message(RecordDict({record: ConfigRecord({})}), dst_node_id=1, message_type=kind)

    assert is_secagg_message(message("train", RECORD_KEY_CONFIGS))
    assert is_secagg_message(message("evaluate", "evaluateins.config"))
    assert not is_secagg_message(message("train", wire.CONFIG))
    assert not is_secagg_message(message("evaluate", wire.CONFIG))
    assert not is_secagg_message(message("query.roster", RECORD_KEY_CONFIGS))


GLOBAL = {"w": np.array([[1.0, -2.0]], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}


def _strategy(observed: list) -> SecAggFedAvg:
    return SecAggFedAvg(
        RunConfig(secagg=True, num_clients=3),
        StaticGrid([1, 2, 3]),
        GLOBAL,
        round_offset=4,
        on_results=[lambda rnd, stage, clients: observed.append((rnd, stage, clients))],
        on_aggregate=[observed.append],
    )


def _results(average: list[np.ndarray], partitions: list[int]) -> list[tuple[None, FitRes]]:
    """What SecAggPlusWorkflow hands the strategy: one shared unmasked average in every FitRes."""
    shared = ndarrays_to_parameters(average)
    ok = Status(Code.OK, "")
    metrics = [{wire.PARTITION_ID: p, wire.TRAIN_LOSS: 0.5, wire.LOCAL_STEPS: 2} for p in partitions]
    return [(None, FitRes(ok, shared, 10 + p, m)) for p, m in zip(partitions, metrics, strict=True)]


def test_strategy_adds_the_unmasked_average_and_reports_the_round() -> None:
    observed: list = []
    average = [np.array([[0.25, 0.5]]), np.array([-0.125])]  # float64, as the workflow dequantises
    parameters, _ = _strategy(observed).aggregate_fit(1, _results(average, [2, 0]), [])
    after = parameters_to_ndarrays(parameters)
    assert (
        after[0].dtype == np.float32 and after[0].tolist() == [[1.25, -1.5]] and after[1].tolist() == [0.375]
    )
    (rnd, stage, clients), aggregate = observed
    assert (rnd, stage) == (5, "train"), "rounds are absolute (offset 4)"
    assert [c.partition_id for c in clients] == [0, 2] and [c.num_examples for c in clients] == [10, 12]
    assert aggregate.server_round == 5 and aggregate.total_examples == 22
    assert aggregate.before["w"].tolist() == [[1.0, -2.0]] and aggregate.after["w"].tolist() == [[1.25, -1.5]]


def test_strategy_stops_the_run_before_a_non_finite_global_model() -> None:
    with pytest.raises(RunFailedError, match=r"round 5: the unmasked aggregate of 'w' is not finite"):
        _strategy([]).aggregate_fit(1, _results([np.array([[np.inf, 0.0]]), np.array([0.0])], [0]), [])
    huge = [np.array([[1e39, 0.0]]), np.array([0.0])]  # finite in float64, Inf in the float32 model
    with pytest.raises(RunFailedError, match=r"makes the global model's 'w' non-finite; training diverged"):
        _strategy([]).aggregate_fit(1, _results(huge, [0]), [])
    with pytest.raises(RunFailedError, match="round 5: no client's update reached the secure sum"):
        _strategy([]).aggregate_fit(1, [], [RuntimeError("gone")])


def test_a_halted_secagg_stage_stops_the_run_naming_the_client_error() -> None:
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 2})
    state = WorkflowState(sampled_node_ids={1, 2, 3}, active_node_ids=set(), threshold=2)
    text = f"{NON_FINITE_UPDATE} in 'w'; SecAgg+ cannot sum it"  # as Flower's simulation wraps it:
    reason = f"<class 'ClientAppException'>:<'\nException ClientAppException occurred. Message: {text}'>"
    state.failures.append(Exception(type("Error", (), {"reason": reason})()))
    workflow = CheckedSecAggPlusWorkflow(3, 2, max_weight=100.0, round_offset=3)
    assert workflow._checked("setup", True, context, state)
    with pytest.raises(RunFailedError) as caught:
        workflow._checked("collect-masked-vectors", False, context, state)
    message = str(caught.value)
    assert message.startswith(
        "round 5: secure aggregation stopped at its collect-masked-vectors stage (0 of 3 sampled clients "
        f"still answering, reconstruction threshold 2); first client error: {NON_FINITE_UPDATE} in 'w'"
    )
    assert message.endswith(DIVERGED)


def _audit_rows(path: Path) -> list[dict[str, str]]:
    with open(path / "audit.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_aggregate_auditor_attacks_the_sum_as_one_batch_and_says_why(tmp_path: Path) -> None:
    config = RunConfig(secagg=True, num_clients=3, audit=True, learning_rate=0.1)
    before = {k: v.numpy() for k, v in model_for(config).state_dict().items()}
    after = {k: v - 0.01 for k, v in before.items()}
    metrics = {wire.LOCAL_STEPS: 4, **wire.privacy_metrics(("topk(0.1)",), ())}
    clients = [ClientResult(p, 100 + p, metrics) for p in range(3)]
    AggregateAuditor(config, tmp_path)(AggregateRound(7, before, after, clients))
    (row,) = _audit_rows(tmp_path)
    assert row["round"] == "7" and row["partition_id"] == "" and row["batch_size"] == "303"
    assert row["threat"].startswith("SecAgg+ aggregate of 3 clients (b=303, s=4")
    assert row["defences"] == "topk(0.1) secagg"
    assert row["note"].startswith(PER_CLIENT_IMPOSSIBLE) and row["local_steps"] == "4"
    assert (tmp_path / "audit" / "round-0007.png").stat().st_size > 1000


def test_a_failing_aggregate_audit_does_not_stop_the_round(tmp_path: Path, caplog) -> None:
    config = RunConfig(secagg=True, num_clients=3, audit=True)
    AggregateAuditor(config, tmp_path)(AggregateRound(1, {}, {}, []))  # no arrays: cannot even load
    assert "the audit of the aggregate failed; the federation goes on" in caplog.text
    assert _audit_rows(tmp_path) == []


# --- SecAgg+ federations (slow) --------------------------------------------------------------------

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
    audit = _audit_rows(audited_run)
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
    assert [r["threat"] for r in _audit_rows(stopped)] == [r["threat"] for r in _audit_rows(audited_run)]


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
from fedsim.federation.server_app import FederationPlan
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
