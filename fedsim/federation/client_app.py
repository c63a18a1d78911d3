"""The Flower ClientApp: trains and evaluates the global model on this node's partition.

The server sends the whole run config with each message, so the same ClientApp serves a
`fedsim run` simulation, `flwr run .` and a real SuperNode without local configuration; the
node's own `partition-id` (node config) picks its data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import ClientData, client_data
from fedsim.federation import wire
from fedsim.training.local import evaluate, model_for, train_locally
from models import ZooModel

app = ClientApp()


def _partition_id(context: Context) -> int:
    return int(context.node_config.get(wire.PARTITION_ID, 0))


@dataclass(frozen=True)
class _Job:
    """What one train/evaluate message asks of this node."""

    config: RunConfig
    record: ConfigRecord
    model: ZooModel
    partition_id: int
    data: ClientData


def _job(msg: Message, context: Context) -> _Job:
    torch.set_num_threads(1)  # one actor per core; intra-op threads would oversubscribe
    record = msg.content[wire.CONFIG]
    config = wire.run_config_from_record(record)
    model = model_for(config)
    model.load_state_dict(msg.content[wire.ARRAYS].to_torch_state_dict())
    partition_id = _partition_id(context)
    return _Job(config, record, model, partition_id, client_data(config, partition_id))


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = _job(msg, context)
    result = train_locally(
        job.model,
        job.data,
        job.config,
        server_round=int(job.record[wire.SERVER_ROUND]),
        partition_id=job.partition_id,
        proximal_mu=float(job.record.get(wire.PROXIMAL_MU, 0.0)),
    )
    metrics = {
        wire.TRAIN_LOSS: result.train_loss,
        wire.NUM_EXAMPLES: result.num_examples,
        wire.LOCAL_STEPS: result.steps,
        wire.SECONDS: result.seconds,
    }
    truth = None
    if job.config.audit:
        seen = result.seen
        truth = wire.encode_truth(job.data.x_train[seen].numpy(), job.data.y_train[seen].numpy())
    extras = {name: wire.encode_extra(payload) for name, payload in result.extra_records.items()}
    return _reply(msg, job, metrics, ArrayRecord(result.weights), truth, extras)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    job = _job(msg, context)
    result = evaluate(job.model, job.data.x_val, job.data.y_val)
    metrics = {**wire.eval_metrics(result.loss, result.metrics), wire.NUM_EXAMPLES: result.num_examples}
    return _reply(msg, job, metrics)


@app.query("roster")
def roster(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, so it can sample reproducibly."""
    content = RecordDict({wire.CLIENT: ConfigRecord({wire.PARTITION_ID: _partition_id(context)})})
    return Message(content, reply_to=msg)
