"""The Flower ServerApp: runs the configured strategy, scores the global model on the held-out
test split every round, and records everything in the run store.

`fedsim run` builds a ServerApp around an already-validated config (`build_server_app`);
`flwr run .` uses the module-level `app`, which reads `context.run_config`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import dataset_for, server_test_split
from fedsim.errors import RunFailedError
from fedsim.federation.secagg_server import build_secagg_server_app, run_secagg_federation
from fedsim.federation.straggler_grid import StragglerDeadlineGrid
from fedsim.plan.federation_plan import FederationPlan
from fedsim.plan.planning import validate_plan
from fedsim.store.fault_log import FaultLog
from fedsim.store.plots import plot_metrics
from fedsim.store.run_store import PLOT_FILE, RunStore
from fedsim.strategy.auditor.strategy import AuditingStrategy, auditing_wrapper
from fedsim.strategy.central_dp import CentralPrivacy
from fedsim.strategy.chain import StrategyChain, build_chain
from fedsim.strategy.ordering import partition_of
from fedsim.strategy.privacy_ledger import PrivacyLedger
from fedsim.strategy.validation import DIVERGED
from fedsim.training.local import evaluate, metric_names, model_for, training_settings
from models.base import federated_state, load_federated_state


def _client_rows(stage: str, server_round: int, replies: list[Message]) -> list[dict[str, object]]:
    """One row per reply that reports metrics, rejected ones included (validation, which
    comes later in the chain, logs why it rejected them)."""
    rows = []
    for reply in replies:
        if reply.has_error() or wire.METRICS not in reply.content.metric_records:
            continue
        metrics = reply.content.metric_records[wire.METRICS]
        rows.append(
            {
                "round": server_round,
                "partition_id": partition_of(reply),
                "stage": stage,
                "train_loss": metrics.get(wire.TRAIN_LOSS),
                **wire.eval_columns(metrics),
                "num_examples": _count(metrics.get(wire.NUM_EXAMPLES)),
                "seconds": metrics.get(wire.SECONDS),
            }
        )
    return rows


def _count(value: object) -> int | None:
    """An example count as an integer; a malformed one (rejected later) as empty."""
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass(frozen=True)
class StartingPoint:
    done: int  # last complete round
    weights: dict[str, torch.Tensor]
    resumed: bool  # round 0 was scored by an earlier invocation


def _starting_point(
    store: RunStore,
    done: int | None,
    chain: StrategyChain,
    initial: dict[str, torch.Tensor],
    faults: FaultLog,
) -> StartingPoint:
    """The initial model for a new run (round 0 is scored and checkpointed by the first
    evaluation); for a resumed one the newest checkpoint with the chain's state restored, and
    only then, everything read, the rows of the interrupted round dropped."""
    if done is None:
        return StartingPoint(0, initial, resumed=False)
    # Keep the arrays' own dtype: FedAdam's update promotes them to float64, and casting them
    # back to the model's float32 would make a resumed run drift from a straight one.
    saved, server_state = store.load_checkpoint(done)
    # In the model's own order, not the file's (sorted): Flower's DP clipping pairs arrays by position.
    weights = {name: saved[name] for name in initial}
    chain.load_state_dict(server_state)
    store.roll_back_to(done)
    for logger in (chain.find(AuditingStrategy), chain.find(PrivacyLedger), faults):
        if logger is not None:
            logger.drop_rounds_after(done)
    return StartingPoint(done, weights, resumed=True)


def _privacy_budget(chain: StrategyChain) -> dict[str, float | None]:
    """The server row's ε columns (see `fedsim.store.run_store.EPSILON_COLUMNS`)."""
    central, ledger = chain.find(CentralPrivacy), chain.find(PrivacyLedger)
    return {
        "epsilon_central": central.epsilon() if central is not None else None,
        "epsilon_client_max": ledger.max_client_epsilon() if ledger is not None else None,
    }


def _snapshot(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The strategy state as of now: its checkpoint may be written rounds later."""
    return {key: np.array(value, copy=True) for key, value in state.items()}


def run_federation(grid: Grid, plan: FederationPlan) -> None:
    """Run (or continue) the federation up to `plan.last_round()`, checkpointing every round."""
    config, store = plan.config, plan.store
    data = dataset_for(config)
    model = model_for(config, data)
    # The federated model: what travels, is aggregated and checkpointed (not a frozen base).
    initial = federated_state(model)
    x_test, y_test = server_test_split(config)
    last_complete = store.last_complete_round()
    faults = FaultLog(store.path)
    chain = build_chain(
        config,
        round_offset=last_complete or 0,
        on_train=[lambda rnd, replies: store.append_rows(_client_rows("train", rnd, replies))],
        on_evaluate=[lambda rnd, replies: store.append_rows(_client_rows("evaluate", rnd, replies))],
        on_faults=faults.record,
        audit=auditing_wrapper(config, store.path),
        model_dtypes={name: tensor.numpy().dtype for name, tensor in initial.items()},
        output_dir=store.path,
        model=model,
        settings=training_settings(config),
    )
    start = _starting_point(store, last_complete, chain, initial, faults)
    auditor = chain.find(AuditingStrategy)
    done = start.done
    round_started = [time.perf_counter()]

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        absolute = server_round + done
        if server_round == 0 and start.resumed:
            return None  # already scored before the interruption
        weights = arrays.to_torch_state_dict()
        load_federated_state(model, weights)
        result = evaluate(model, x_test, y_test)
        seconds = time.perf_counter() - round_started[0]  # the round's wall time, server row only
        round_started[0] = time.perf_counter()
        scores = wire.eval_metrics(result.loss, result.metrics)
        store.append_rows(
            [
                {
                    "round": absolute,
                    "stage": "server",
                    **wire.eval_columns(scores),
                    "num_examples": result.num_examples,
                    "seconds": seconds,
                    **_privacy_budget(chain),
                }
            ]
        )
        if not math.isfinite(result.loss):  # finite but huge weights: diverged all the same
            raise RunFailedError(
                f"round {absolute}: the global model's test loss is {result.loss}; {DIVERGED}"
            )
        # Last: the round's commit marker, and only once the round's audit is written (audits run
        # behind the rounds): a run killed with audits pending resumes before them, re-auditing.
        commit = functools.partial(store.save_checkpoint, absolute, weights, _snapshot(chain.state_dict()))
        if auditor is None:
            commit()
        else:
            auditor.after_audits(commit)
        return MetricRecord(scores)

    run_config = wire.run_config_record(config)
    remaining = plan.last_round() - done
    try:
        if remaining > 0:
            chain.outer.start(
                grid=StragglerDeadlineGrid(grid, config.round_timeout),
                initial_arrays=ArrayRecord(start.weights),
                num_rounds=remaining,
                train_config=run_config,
                evaluate_config=run_config,
                evaluate_fn=evaluate_global,
            )
    finally:
        if auditor is not None:  # the run ends when its audits (and the checkpoints after them) do
            auditor.close()
    plot_metrics(store.metrics_path, store.path / PLOT_FILE)


def build_server_app(plan: FederationPlan) -> ServerApp:
    """A ServerApp bound to a validated plan (what `fedsim run` launches)."""
    if plan.config.secagg:
        return build_secagg_server_app(plan)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, plan)

    return server_app


app = ServerApp()


@app.main()
def flwr_main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: config from `[tool.flwr.app.config]` and `-c` overrides.

    `runs-dir` (default `runs`, best given as an absolute path since the SuperLink may run the
    app elsewhere) picks where the run directory `<name>-<run id>` is written.
    """
    values = dict(context.run_config)
    runs_dir = Path(str(values.pop("runs-dir", "runs")))
    config = RunConfig.from_mapping(values, source="run config")
    config = config.replace(name=f"{config.name}-{context.run_id}")
    validate_plan(config)
    plan = FederationPlan(config, RunStore.create(runs_dir, config, metric_names(config)))
    if config.secagg:
        run_secagg_federation(grid, context, plan)
    else:
        run_federation(grid, plan)
