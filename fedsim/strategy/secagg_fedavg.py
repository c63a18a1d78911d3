"""FedAvg for `--secagg`: the legacy Flower strategy that `SecAggPlusWorkflow` drives.

SecAgg+ exists only on Flower's legacy API, where the workflow asks a legacy `Strategy` whom to
train (`configure_fit`) and hands it the unmasked result (`aggregate_fit`). That result is
already the FedAvg average of the clients' updates, weighted by their example counts (the
workflow weights before it masks, see `fedsim.plan.secagg`), and the workflow puts
the same array list into every client's `FitRes`. This strategy therefore takes it as it is
(Flower's `FedAvg.aggregate_fit` would re-average n copies of it, in reply order) and adds it to
the global model. It does what the Message API path's ordering and validation wrappers do:

- samples the same clients a plain run samples: nodes in partition order, `random` seeded from
  (seed, absolute round), Flower's own `sample_nodes`;
- numbers rounds absolutely (a resumed run continues at k+1);
- stops the run (`RunFailedError`) when no client's update reached the sum, or when the new
  global model would hold NaN or Inf; clients refuse non-finite updates themselves, before the
  quantiser would turn them into finite garbage (`fedsim.federation.secagg_client`);
- hands each round's client results (their metrics travel in clear under SecAgg+) and the
  aggregate update to observers: the run store's rows and the aggregate auditor.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError
from fedsim.strategy.ordering import PartitionOrderedGrid
from fedsim.strategy.validation import DIVERGED

log = logging.getLogger(__name__)

Failure = tuple[ClientProxy, FitRes] | BaseException


@dataclass(frozen=True)
class ClientResult:
    """One client's clear-text part of a SecAgg+ reply: what the server may log of it."""

    partition_id: int | None
    num_examples: int
    metrics: Mapping[str, Scalar]


@dataclass(frozen=True)
class AggregateRound:
    """What the server saw of one round: the global model before and after, and the clients."""

    server_round: int  # absolute
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    clients: list[ClientResult]

    @property
    def total_examples(self) -> int:
        return sum(c.num_examples for c in self.clients)


ResultsObserver = Callable[[int, str, list[ClientResult]], None]  # (round, "train"|"evaluate", results)
AggregateObserver = Callable[[AggregateRound], None]


class SecAggFedAvg(Strategy):
    """See the module docstring. `names`: the model's state-dict names, in the order of the
    legacy parameter lists; `initial`: the global model to start from (state-dict arrays)."""

    def __init__(
        self,
        config: RunConfig,
        grid: Grid,
        initial: Mapping[str, np.ndarray],
        round_offset: int = 0,
        on_results: Iterable[ResultsObserver] = (),
        on_aggregate: Iterable[AggregateObserver] = (),
    ) -> None:
        super().__init__()
        self.config = config
        self.names = list(initial)
        self.dtypes = {name: array.dtype for name, array in initial.items()}
        self.global_arrays = dict(initial)
        self.round_offset = round_offset
        self.on_results = list(on_results)
        self.on_aggregate = list(on_aggregate)
        need_roster = config.fraction_train < 1 or 0 < config.fraction_evaluate < 1
        self.grid = PartitionOrderedGrid(grid, config.num_clients, need_roster)
        self.instructions = dict(wire.run_config_record(config))
        self.sampled = 0  # clients asked to train this round

    def __repr__(self) -> str:
        return f"SecAggFedAvg(fraction_train={self.config.fraction_train})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([self.global_arrays[n] for n in self.names])

    def _sample(self, server_round: int, stage: str, fraction: float, client_manager: ClientManager):
        """The nodes a plain run samples in this round, as ClientProxies (see module docstring)."""
        absolute = server_round + self.round_offset
        node_ids = self.grid.get_node_ids()  # waits for every node; a roster query draws from `random`
        random.seed(f"{self.config.seed}:{absolute}:{stage}")
        sampled, _ = sample_nodes(self.grid, self.config.num_clients, max(int(len(node_ids) * fraction), 1))
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        missing = [node for node in sampled if node not in proxies]
        if missing:
            raise RuntimeError(f"round {absolute}: sampled nodes {missing} are not in the client manager")
        config = {**self.instructions, wire.SERVER_ROUND: absolute}
        return [proxies[node] for node in sampled], config

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        proxies, config = self._sample(server_round, "train", self.config.fraction_train, client_manager)
        self.sampled = len(proxies)
        return [(proxy, FitIns(parameters, dict(config))) for proxy in proxies]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        absolute = server_round + self.round_offset
        # Not len(failures): SecAggPlusWorkflow lists a client that fails at its collect stage twice.
        failed = max(self.sampled - len(results), 1 if failures else 0)
        if failed:
            reason = failure_reason(failures[0]) if failures else "unknown"
            log.warning(
                "round %d: %d of %d clients failed during secure aggregation; the sum holds the others "
                "(first error: %s)",
                absolute, failed, len(results) + failed, reason,
            )  # fmt: skip
        if not results:
            raise RunFailedError(f"round {absolute}: no client's update reached the secure sum")
        average = self._unmasked_average(absolute, results)
        after = {}
        for name, delta in zip(self.names, average, strict=True):
            before = self.global_arrays[name]
            summed = before.astype(np.float64) + delta
            if not np.issubdtype(self.dtypes[name], np.floating):
                summed = np.rint(summed)
            with np.errstate(over="ignore"):  # an overflow to Inf is reported just below
                after[name] = summed.astype(self.dtypes[name])
            if not np.isfinite(after[name]).all():
                raise RunFailedError(
                    f"round {absolute}: the securely aggregated update makes the global model's {name!r} "
                    f"non-finite; {DIVERGED}"
                )
        clients = sorted((_client(fitres) for _, fitres in results), key=_order)
        aggregate = AggregateRound(absolute, self.global_arrays, after, clients)
        self.global_arrays = after
        for observer in self.on_results:
            observer(absolute, "train", clients)
        for observer in self.on_aggregate:
            observer(aggregate)
        return ndarrays_to_parameters([after[n] for n in self.names]), {}

    def _unmasked_average(self, absolute: int, results: list[tuple[ClientProxy, FitRes]]) -> list[np.ndarray]:
        """The workflow's unmasked, weighted average of the updates (one list shared by all results)."""
        first = results[0][1].parameters
        if any(fitres.parameters is not first for _, fitres in results):
            raise RuntimeError(f"round {absolute}: SecAgg+ results do not share one aggregate")
        average = parameters_to_ndarrays(first)
        shapes = [self.global_arrays[n].shape for n in self.names]
        if [a.shape for a in average] != shapes:
            raise RuntimeError(f"round {absolute}: the unmasked aggregate does not fit the model")
        for name, delta in zip(self.names, average, strict=True):
            if not np.isfinite(delta).all():
                raise RunFailedError(f"round {absolute}: the unmasked aggregate of {name!r} is not finite")
        return average

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.config.fraction_evaluate == 0:
            return []
        proxies, config = self._sample(
            server_round, "evaluate", self.config.fraction_evaluate, client_manager
        )
        return [(proxy, EvaluateIns(parameters, dict(config))) for proxy in proxies]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        absolute = server_round + self.round_offset
        if failures:
            log.warning("round %d: %d clients failed to evaluate", absolute, len(failures))
        clients = sorted((_client(res) for _, res in results), key=_order)
        for observer in self.on_results:
            observer(absolute, "evaluate", clients)
        if not results:
            return None, {}
        total = sum(res.num_examples for _, res in results)
        return sum(res.loss * res.num_examples for _, res in results) / max(total, 1), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """None: the ServerApp scores the global model itself, after federated evaluation, and
        checkpoints it then (the round's commit marker), as on the Message API path."""
        return None


def failure_reason(failure: BaseException | tuple[ClientProxy, FitRes]) -> str:
    """A failed client's own exception message, out of Flower's `Error` wrapping."""
    if isinstance(failure, tuple):
        return failure[1].status.message or "no reason given"
    error = failure.args[0] if failure.args else failure
    reason = str(getattr(error, "reason", error)).strip()
    last = reason.splitlines()[-1] if reason else "no reason given"
    return last.rpartition("Message: ")[2].removesuffix("'>")


def _client(result: FitRes | EvaluateRes) -> ClientResult:
    metrics = dict(result.metrics or {})
    partition = metrics.pop(wire.PARTITION_ID, None)
    return ClientResult(partition if isinstance(partition, int) else None, int(result.num_examples), metrics)


def _order(client: ClientResult) -> int:
    return client.partition_id if client.partition_id is not None else 1 << 62
