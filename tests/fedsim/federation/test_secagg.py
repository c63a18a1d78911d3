"""`fedsim run --secagg`: Flower's SecAgg+ as a run mode, the aggregate audited and validated.

Fast tests cover the plan-time refusals, the client's refusal of unmaskable updates, message
routing, the legacy strategy's aggregation and the aggregate auditor; slow ones run SecAgg+
federations (each in its own process) and check the aggregate against plain FedAvg.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from typer.testing import CliRunner

from fedsim import wire
from fedsim.cli import cli
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError
from fedsim.federation.secagg_client import (
    NON_FINITE_UPDATE,
    UnmaskableUpdateError,
    check_maskable,
    is_secagg_message,
)
from fedsim.federation.secagg_server import CheckedSecAggPlusWorkflow
from fedsim.plan.secagg import check_secagg
from fedsim.strategy.auditor.aggregate import PER_CLIENT_IMPOSSIBLE, AggregateAuditor
from fedsim.strategy.secagg_fedavg import AggregateRound, ClientResult, SecAggFedAvg
from fedsim.strategy.validation import DIVERGED
from fedsim.training.local import model_for
from tests.support.flower_messages import StaticGrid, act_as_server
from tests.support.secagg import audit_rows

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


def test_aggregate_auditor_attacks_the_sum_as_one_batch_and_says_why(tmp_path: Path) -> None:
    config = RunConfig(secagg=True, num_clients=3, audit=True, learning_rate=0.1)
    before = {k: v.numpy() for k, v in model_for(config).state_dict().items()}
    after = {k: v - 0.01 for k, v in before.items()}
    metrics = {wire.LOCAL_STEPS: 4, **wire.privacy_metrics(("topk(0.1)",), ())}
    clients = [ClientResult(p, 100 + p, metrics) for p in range(3)]
    AggregateAuditor(config, tmp_path)(AggregateRound(7, before, after, clients))
    (row,) = audit_rows(tmp_path)
    assert row["round"] == "7" and row["partition_id"] == "" and row["batch_size"] == "303"
    assert row["threat"].startswith("SecAgg+ aggregate of 3 clients (b=303, s=4")
    assert row["defences"] == "topk(0.1) secagg"
    assert row["note"].startswith(PER_CLIENT_IMPOSSIBLE) and row["local_steps"] == "4"
    assert (tmp_path / "audit" / "round-0007.png").stat().st_size > 1000


def test_a_failing_aggregate_audit_does_not_stop_the_round(tmp_path: Path, caplog) -> None:
    config = RunConfig(secagg=True, num_clients=3, audit=True)
    AggregateAuditor(config, tmp_path)(AggregateRound(1, {}, {}, []))  # no arrays: cannot even load
    assert "the audit of the aggregate failed; the federation goes on" in caplog.text
    assert audit_rows(tmp_path) == []


# --- SecAgg+ federations (slow) --------------------------------------------------------------------
