"""The client side of `--secagg`: Flower's SecAgg+ exists only on its legacy API, so the node
answers SecAgg+ messages with a `NumPyClient` behind `secaggplus_mod`, as Flower's `fl-dp-sa`
example does.

The client trains exactly as on the Message API path (`train_locally`, seeded by run seed, round
and partition id) and returns its update Δ = local − global in float64; `secaggplus_mod` then
quantises it (see `fedsim.plan.secagg`), masks it and sends only the masked integers.
Metrics (loss, example count, steps, partition id) travel in clear, as Flower's SecAgg+ sends them.

Two things the mod cannot do right are done here, before it quantises:
- an update with NaN/Inf, or with an entry the quantiser would clip, is refused (the node fails
  this round; SecAgg+ recovers its masks from its neighbours' shares and sums the others), since
  the quantiser would turn it into finite garbage in the sum;
- numpy's global RNG, from which Flower's stochastic rounding draws, is seeded from (run seed,
  round, partition id), so a SecAgg+ run repeats exactly, and resumes exactly.

`route_secagg` is a mod for fedsim's own ClientApp: it hands SecAgg+ and legacy evaluate
messages to `secagg_client_app` and everything else (the roster query, Message API rounds) on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.federation.node_config import load_node_data, partition_id_of
from fedsim.plan.secagg import CLIPPING_RANGE, max_weight
from fedsim.training.local import evaluate, model_for, train_locally
from models import ZooModel
from models.base import load_federated_state

# What Flower's legacy API names a federated-evaluation request's config (`recorddict_compat`).
LEGACY_EVALUATE_CONFIG = "evaluateins.config"
# Why a client refused to send its update; the server looks for it to advise on divergence.
NON_FINITE_UPDATE = "the update holds NaN or Inf"


class UnmaskableUpdateError(ValueError):
    """An update SecAgg+ would corrupt silently (non-finite, or beyond its quantisation range)."""


def quantisation_seed(config: RunConfig, server_round: int, partition_id: int) -> int:
    """Seed of numpy's global RNG for Flower's stochastic rounding of this client's update."""
    return int(np.random.SeedSequence([config.seed, server_round, partition_id, 1]).generate_state(1)[0])


def check_maskable(update: dict[str, np.ndarray], weight: float) -> None:
    """Refuse an update the quantiser would corrupt: it clips `weight · Δ` to ±CLIPPING_RANGE and
    casts NaN to an arbitrary integer."""
    for name, delta in update.items():
        if not np.isfinite(delta).all():
            raise UnmaskableUpdateError(f"{NON_FINITE_UPDATE} in {name!r}; SecAgg+ cannot sum it")
        largest = float(np.abs(delta).max(initial=0.0)) * weight
        if largest > CLIPPING_RANGE:
            raise UnmaskableUpdateError(
                f"update entry {largest:.4g} in {name!r} (scaled by its weight) exceeds SecAgg+'s "
                f"quantisation range ±{CLIPPING_RANGE:g}; lower --learning-rate"
            )


class SecAggClient(NumPyClient):
    """Trains and evaluates on this node's partition; parameters are the model's federated
    arrays in `federated_names` order (both sides build the same model from the run config), and
    the masked vector is the update of exactly those (planning refuses a model that would send
    fewer under SecAgg+, `fedsim.plan.secagg.check_secagg_model`)."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        self.node_config = dict(node_config)
        self.partition_id = partition_id_of(node_config)

    def _model(self, parameters: list[np.ndarray], config: dict) -> tuple[RunConfig, ZooModel, list[str]]:
        torch.set_num_threads(1)  # one actor per core; intra-op threads would oversubscribe
        run_config = wire.run_config_from_record(config)
        model = model_for(run_config)
        names = list(model.federated_names())
        if len(names) != len(parameters):
            raise ValueError(f"got {len(parameters)} arrays for a model of {len(names)}")
        load_federated_state(
            model, {n: torch.from_numpy(np.array(a)) for n, a in zip(names, parameters, strict=True)}
        )
        return run_config, model, names

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        run_config, model, names = self._model(parameters, config)
        server_round = int(config[wire.SERVER_ROUND])
        _, data = load_node_data(self.node_config, run_config)
        result = train_locally(model, data, run_config, server_round, self.partition_id)
        if list(result.weights) != names:
            raise ValueError(
                f"round {server_round}: {run_config.model} sends {len(result.weights)} of its "
                f"{len(names)} federated arrays; SecAgg+ masks the whole federated model"
            )
        update = {
            name: result.weights[name].numpy().astype(np.float64) - np.asarray(before, dtype=np.float64)
            for name, before in zip(names, parameters, strict=True)
        }
        check_maskable(update, result.num_examples / max_weight(run_config))
        np.random.seed(quantisation_seed(run_config, server_round, self.partition_id))
        metrics = {
            wire.TRAIN_LOSS: result.train_loss,
            wire.LOCAL_STEPS: result.steps,
            wire.SECONDS: result.seconds,
            wire.PARTITION_ID: self.partition_id,
            **wire.privacy_metrics(result.defences, result.privacy),
        }
        return list(update.values()), result.num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        run_config, model, _ = self._model(parameters, config)
        _, data = load_node_data(self.node_config, run_config)
        result = evaluate(model, data.x_val, data.y_val)
        metrics = {**wire.eval_metrics(result.loss, result.metrics), wire.PARTITION_ID: self.partition_id}
        return result.loss, result.num_examples, metrics


def _client_fn(context: Context):
    return SecAggClient(context.node_config).to_client()


# Flower's legacy ClientApp; the mod ignores evaluate messages, which reach `SecAggClient.evaluate`.
secagg_client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])


def is_secagg_message(msg: Message) -> bool:
    """A SecAgg+ round's message (any of its four stages) or a legacy evaluate request."""
    records = msg.content.config_records
    if msg.metadata.message_type == MessageType.TRAIN:
        return RECORD_KEY_CONFIGS in records
    return msg.metadata.message_type == MessageType.EVALUATE and LEGACY_EVALUATE_CONFIG in records


def route_secagg(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mod for fedsim's ClientApp: SecAgg+ runs go to the legacy app, the rest on as before."""
    if is_secagg_message(msg):
        return secagg_client_app(msg, context)
    return call_next(msg, context)
