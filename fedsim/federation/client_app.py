"""The Flower ClientApp: trains and evaluates the global model on this node's partition.

The server sends the whole run config with each message, so the same ClientApp serves a
`fedsim run` simulation, `flwr run .` and a real SuperNode without local configuration; the
node's own node config picks its data: `partition-id` (+ `num-partitions`) for a slice of the
run's dataset, or `data-path` for a local file (fedsim.federation.node_config).

Whether the node ships the raw samples it trained on (for the auditor to score reconstructions)
is the node's decision, never the server's: a SuperNode opts in with node config
`audit-truth=true`; fedsim's own simulation, whose virtual nodes Flower cannot configure,
builds its ClientApp with `build_client_app(share_truth=True)`. The module-level `app` (`flwr run
.`, deployments) does not share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedsim import wire
from fedsim.data.clients import ClientData
from fedsim.federation.central_dp_mod import asks_for_client_clipping, central_dp_mod
from fedsim.federation.node_config import load_node_data, partition_id_of
from fedsim.federation.secagg_client import route_secagg
from fedsim.training.local import evaluate, model_for, train_locally
from models import ZooModel
from models.base import federated_state, load_federated_state


@dataclass(frozen=True)
class _Job:
    """What one train/evaluate message asks of this node."""

    instructions: wire.Instructions
    model: ZooModel
    partition_id: int
    data: ClientData


def node_opts_in_to_truth(node_config: Mapping[str, Any]) -> bool:
    """The node's own opt-in to ship training samples: node config `audit-truth=true`."""
    value = node_config.get(wire.AUDIT_TRUTH, False)
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _job(msg: Message, context: Context) -> _Job:
    torch.set_num_threads(1)  # one actor per core; intra-op threads would oversubscribe
    instructions = wire.read_instructions(msg.content)
    model = model_for(instructions.config)
    # The federated entries only (strict); the rest (a frozen pretrained base) stays as built.
    load_federated_state(model, msg.content[wire.ARRAYS].to_torch_state_dict())
    partition_id, data = load_node_data(context.node_config, instructions.config)
    return _Job(instructions, model, partition_id, data)


def _reply(
    msg: Message,
    job: _Job,
    metrics: dict[str, float | int],
    arrays: ArrayRecord | None = None,
    truth: ConfigRecord | None = None,
    extras: dict[str, ConfigRecord] | None = None,
) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    content[wire.CLIENT] = ConfigRecord({wire.PARTITION_ID: job.partition_id})
    if truth is not None:
        content[wire.AUDIT_TRUTH] = truth
    for name, record in (extras or {}).items():
        content[wire.EXTRA_PREFIX + name] = record
    return Message(content, reply_to=msg)


def train(msg: Message, context: Context, share_truth: bool = False) -> Message:
    """Train on this node's partition and reply with the entries the model sends this round
    (`sent_names`; the server completes a partial reply from its global model); attach the
    samples only if the node opted in (`share_truth` or node config `audit-truth=true`) and the
    server audits."""
    job = _job(msg, context)
    config = job.instructions.config
    result = train_locally(
        job.model,
        job.data,
        config,
        server_round=job.instructions.server_round,
        partition_id=job.partition_id,
        proximal_mu=job.instructions.proximal_mu,
    )
    metrics = {
        wire.TRAIN_LOSS: result.train_loss,
        wire.NUM_EXAMPLES: result.num_examples,
        wire.LOCAL_STEPS: result.steps,
        wire.SECONDS: result.seconds,
    }
    truth = None
    if config.audit and (share_truth or node_opts_in_to_truth(context.node_config)):
        seen = result.seen
        truth = wire.encode_truth(job.data.x_train[seen].numpy(), job.data.y_train[seen].numpy())
    extras = {name: wire.encode_extra(payload) for name, payload in result.extra_records.items()}
    weights = result.weights
    if asks_for_client_clipping(msg):  # Flower's clipping mod needs the message's every array back
        whole = federated_state(job.model)
        weights = {name: weights[name] if name in weights else whole[name] for name in whole}
    reply = _reply(msg, job, metrics, ArrayRecord(weights), truth, extras)
    if result.defences:
        reply.content[wire.PRIVACY] = wire.encode_privacy(result.defences, result.privacy)
    return reply


def evaluate_global(msg: Message, context: Context) -> Message:
    job = _job(msg, context)
    result = evaluate(job.model, job.data.x_val, job.data.y_val)
    metrics = {**wire.eval_metrics(result.loss, result.metrics), wire.NUM_EXAMPLES: result.num_examples}
    return _reply(msg, job, metrics)


def roster(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, so it can sample reproducibly."""
    partition_id = partition_id_of(context.node_config)
    content = RecordDict({wire.CLIENT: ConfigRecord({wire.PARTITION_ID: partition_id})})
    return Message(content, reply_to=msg)


def build_client_app(share_truth: bool, mods: Sequence[Mod] = ()) -> ClientApp:
    """fedsim's ClientApp. `share_truth` opts every node running it in to shipping its training
    samples when the server audits (fedsim's simulation); without it only nodes whose node
    config says `audit-truth=true` do. `mods` are Flower mods around every handler."""
    client_app = ClientApp(mods=list(mods))

    @client_app.train(mods=[central_dp_mod])  # train only: see fedsim.federation.central_dp_mod
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, share_truth=share_truth)

    client_app.evaluate()(evaluate_global)
    client_app.query("roster")(roster)
    return client_app


# `flwr run .` and deployed SuperNodes: samples leave a node only by its own node config. SecAgg+
# rounds (`-c secagg=true`) speak Flower's legacy API and are routed to its legacy app.
app = build_client_app(share_truth=False, mods=[route_secagg])
