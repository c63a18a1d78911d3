"""The ServerApp of `--secagg` runs: Flower's SecAgg+ on its legacy API, in fedsim's run.

Flower 1.42 offers SecAgg+ only as a legacy workflow (`SecAggPlusWorkflow` inside
`DefaultWorkflow`, a `LegacyContext` and a legacy strategy), so this ServerApp drives that instead
of a Message API strategy chain. The run is otherwise the same: the same partitions, model,
seeded local training and sampling, the global model scored on the test split after every round,
and the same run store (metrics.csv, checkpoints/round-NNNN.safetensors, audit.csv). A round is
still committed by its checkpoint, written last, after federated evaluation; resume is exact
(no strategy state, and the clients seed Flower's stochastic rounding).

What differs, by construction of SecAgg+: the server receives no client's update, only the
unmasked, quantised, example-weighted average (`fedsim.strategy.secagg_fedavg`); reply
validation and auditing therefore work on the aggregate (`fedsim.strategy.auditor.aggregate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

from fedsim import wire
from fedsim.data.clients import dataset_for, server_test_split
from fedsim.errors import RunFailedError, UserInputError
from fedsim.federation.secagg_client import NON_FINITE_UPDATE
from fedsim.plan.federation_plan import FederationPlan
from fedsim.plan.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE, max_weight
from fedsim.store.plots import plot_metrics
from fedsim.store.run_store import PLOT_FILE, RunStore
from fedsim.strategy.auditor.aggregate import AggregateAuditor
from fedsim.strategy.chain import keeps_privacy_ledger
from fedsim.strategy.privacy_ledger import PrivacyBook, PrivacyLedger
from fedsim.strategy.secagg_fedavg import ClientResult, SecAggFedAvg, failure_reason
from fedsim.strategy.validation import DIVERGED
from fedsim.training.local import evaluate, model_for
from models import ZooModel
from models.base import federated_state, load_federated_state


class CheckedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with fedsim's settings, which stops the run when a stage halts:
    Flower only logs "Secure aggregation halted" and the round would go on with the old model."""

    def __init__(self, shares: int, threshold: int, max_weight: float, round_offset: int = 0) -> None:
        super().__init__(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=max_weight,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
        )
        self.round_offset = round_offset

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._checked("setup", super().setup_stage(grid, context, state), context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._checked("share-keys", super().share_keys_stage(grid, context, state), context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        return self._checked("collect-masked-vectors", ok, context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._checked("unmask", super().unmask_stage(grid, context, state), context, state)

    def _checked(self, stage: str, ok: bool, context: LegacyContext, state: WorkflowState) -> bool:
        if ok:
            return True
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        reasons = [failure_reason(failure) for failure in state.failures]
        cause = f"; first client error: {reasons[0]}" if reasons else ""
        if any(NON_FINITE_UPDATE in reason for reason in reasons):
            cause += f"; {DIVERGED}"
        raise RunFailedError(
            f"round {current + self.round_offset}: secure aggregation stopped at its {stage} stage "
            f"({len(state.active_node_ids)} of {len(state.sampled_node_ids)} sampled clients still "
            f"answering, reconstruction threshold {state.threshold}){cause}"
        )


def client_rows(server_round: int, stage: str, clients: list[ClientResult]) -> list[dict[str, object]]:
    """metrics.csv rows of the clients' clear-text metrics (SecAgg+ masks only parameters)."""
    return [
        {
            "round": server_round,
            "partition_id": client.partition_id,
            "stage": stage,
            "train_loss": client.metrics.get(wire.TRAIN_LOSS),
            **wire.eval_columns(client.metrics),
            "num_examples": client.num_examples,
            "seconds": client.metrics.get(wire.SECONDS),
        }
        for client in clients
    ]


def ledger_rows(book: PrivacyBook, server_round: int, clients: list[ClientResult]) -> list[dict[str, object]]:
    """privacy.csv rows of the spends the clients reported in clear beside their masked updates."""
    return [
        row
        for client in clients
        if client.partition_id is not None
        for row in book.client_rows(
            server_round, client.partition_id, wire.privacy_from_metrics(client.metrics)
        )
    ]


class RoundCommitter:
    """Scores the global model on the test split, writes the round's server row, then its
    checkpoint (last: the commit marker of the round) with the privacy ledger's state."""

    def __init__(
        self,
        store: RunStore,
        model: ZooModel,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        book: PrivacyBook | None = None,
    ) -> None:
        self.book = book
        self.store = store
        self.model = model
        self.x_test, self.y_test = x_test, y_test
        self.round_started = time.perf_counter()

    def __call__(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        weights = {name: torch.from_numpy(np.array(array)) for name, array in arrays.items()}
        load_federated_state(self.model, weights)
        result = evaluate(self.model, self.x_test, self.y_test)
        seconds = time.perf_counter() - self.round_started
        self.round_started = time.perf_counter()
        scores = wire.eval_metrics(result.loss, result.metrics)
        row = {"round": server_round, "stage": "server", **wire.eval_columns(scores)}
        epsilon = self.book.max_client_epsilon() if self.book is not None else None
        self.store.append_rows(
            [{**row, "num_examples": result.num_examples, "seconds": seconds, "epsilon_client_max": epsilon}]
        )
        if not math.isfinite(result.loss):
            raise RunFailedError(
                f"round {server_round}: the global model's test loss is {result.loss}; {DIVERGED}"
            )
        self.store.save_checkpoint(server_round, weights, ledger_state(self.book))


def _evaluate_then_commit(
    strategy: SecAggFedAvg, commit: Callable[[int, Mapping[str, np.ndarray]], None]
) -> Callable[[Grid, Context], None]:
    """DefaultWorkflow's evaluate step: Flower's federated evaluation, then the round's commit."""

    def workflow(grid: Grid, context: Context) -> None:
        default_evaluate_workflow(grid, context)
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        commit(current + strategy.round_offset, strategy.global_arrays)

    return workflow


def ledger_state(book: PrivacyBook | None) -> dict[str, np.ndarray]:
    """The checkpoint's strategy state of a --secagg run: the privacy ledger's, under the key the
    Message-API chain uses (so one resume check covers both), or nothing."""
    if book is None:
        return {}
    return {f"{PrivacyLedger.state_prefix}/{key}": value for key, value in book.state_dict().items()}


def _starting_weights(
    store: RunStore, model: ZooModel, auditor: AggregateAuditor | None, book: PrivacyBook | None
) -> dict[str, np.ndarray]:
    """The initial model, or on resume the newest checkpoint (and the ledger's state), the
    interrupted round's rows dropped."""
    done = store.last_complete_round()
    if done is None:
        return {name: tensor.numpy() for name, tensor in federated_state(model).items()}
    weights, server_state = store.load_checkpoint(done)
    if set(server_state) != set(ledger_state(book)):
        raise UserInputError(
            f"{store.checkpoint_path(done, 'strategy')} does not hold this --secagg run's state "
            f"({sorted(ledger_state(book)) or 'none'}); delete the run and start again"
        )
    prefix = f"{PrivacyLedger.state_prefix}/"
    if book is not None:
        book.load_state_dict({key.removeprefix(prefix): value for key, value in server_state.items()})
    store.roll_back_to(done)
    for logger in (auditor, book):
        if logger is not None:
            logger.drop_rounds_after(done)
    return {name: weights[name].numpy() for name in model.federated_names()}


def run_secagg_federation(grid: Grid, context: Context, plan: FederationPlan) -> None:
    """Run (or continue) a `--secagg` federation up to `plan.last_round()`, committing every round."""
    config, store = plan.config, plan.store
    data = dataset_for(config)
    model = model_for(config, data)
    done = store.last_complete_round()
    auditor = AggregateAuditor(config, store.path) if config.audit else None
    book = PrivacyBook(store.path, config.target_delta) if keeps_privacy_ledger(config) else None
    initial = _starting_weights(store, model, auditor, book)
    x_test, y_test = server_test_split(config)
    commit = RoundCommitter(store, model, x_test, y_test, book)
    observers = [lambda rnd, stage, clients: store.append_rows(client_rows(rnd, stage, clients))]
    if book is not None:
        observers.append(
            lambda rnd, stage, clients: book.append(
                ledger_rows(book, rnd, clients) if stage == "train" else []
            )
        )
    strategy = SecAggFedAvg(
        config,
        grid,
        initial,
        round_offset=done or 0,
        on_results=observers,
        on_aggregate=[auditor] if auditor is not None else [],
    )
    if done is None:
        commit(0, initial)
    remaining = plan.last_round() - (done or 0)
    if remaining > 0:
        workflow = DefaultWorkflow(
            fit_workflow=CheckedSecAggPlusWorkflow(
                config.secagg_shares, config.secagg_threshold, float(max_weight(config)), done or 0
            ),
            evaluate_workflow=_evaluate_then_commit(strategy, commit),
        )
        workflow(grid, LegacyContext(context, config=ServerConfig(num_rounds=remaining), strategy=strategy))
    plot_metrics(store.metrics_path, store.path / PLOT_FILE)


def build_secagg_server_app(plan: FederationPlan) -> ServerApp:
    """A ServerApp bound to a validated `--secagg` plan (what `fedsim run --secagg` launches)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_secagg_federation(grid, context, plan)

    return server_app
