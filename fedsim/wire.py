"""The record keys that client and server agree on, in one place.

Flower's strategies write their own keys (`server-round`, FedProx's `proximal-mu`, ...) into the
train/evaluate ConfigRecord, so fedsim's run config travels in the same record under its own
namespace, `fedsim.<key>`: no strategy key can collide with a fedsim knob, and the client reads
strategy keys only from the strategy that sets them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsim.config.run_config import RunConfig
from fedsim.training.transforms import PrivacySpend

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
# Side record with the sender's identity; strategies ignore ConfigRecords in replies, and the
# default metric aggregation would average an id sent as a metric.
CLIENT = "client"
PARTITION_ID = "partition-id"
ROSTER_QUERY = "query.roster"

TRAIN_LOSS = "train-loss"
# Evaluation metrics travel as eval-<name> for each of the model's `metric_names` (and loss).
EVAL_PREFIX = "eval-"
EVAL_LOSS = "eval-loss"
NUM_EXAMPLES = "num-examples"
# Under central DP the server sets this weight of 1 on every reply and FedAvg weights by it.
DP_WEIGHT = "dp-weight"
SECONDS = "seconds"
LOCAL_STEPS = "local-steps"
SERVER_ROUND = "server-round"
# Simulation only: the samples a client trained on, so the auditor can score reconstructions.
# Strategies never read ConfigRecords of replies, so aggregation cannot use it.
AUDIT_TRUTH = "audit-truth"
# FedProx's own key (flwr.serverapp.strategy.FedProx writes it); absent for every other strategy.
PROXIMAL_MU = "proximal-mu"
# A model family's extra payloads travel beside the weights as ConfigRecords `extra.<name>`:
# FedAvg-style strategies require exactly one ArrayRecord per reply and ignore ConfigRecords.
EXTRA_PREFIX = "extra."
RUN_CONFIG_PREFIX = "fedsim."
# The client-side defences a node applied and what its accountants spent, for the audit rows and
# the server's privacy ledger: `defences` (labels, space-separated) and, per accounted mechanism,
# `<mechanism>.<field>` for each field of `PrivacySpend`.
PRIVACY = "privacy"
DEFENCES = "defences"


def run_config_record(config: RunConfig) -> ConfigRecord:
    """The run config as the server sends it: every knob under `fedsim.`, so that strategies
    may add their own keys to the same record without shadowing one."""
    return ConfigRecord({RUN_CONFIG_PREFIX + key: value for key, value in config.to_dict().items()})


def run_config_from_record(record: Mapping[str, Any]) -> RunConfig:
    """The run config a server sent inside a train/evaluate ConfigRecord (`fedsim.` keys only)."""
    return RunConfig.from_mapping(
        {k.removeprefix(RUN_CONFIG_PREFIX): v for k, v in record.items() if k.startswith(RUN_CONFIG_PREFIX)},
        source="server message",
    )


@dataclass(frozen=True)
class Instructions:
    """What a train/evaluate message asks of a client, decoded once."""

    config: RunConfig
    server_round: int
    proximal_mu: float  # from FedProx's key only: 0 for every other strategy


def read_instructions(content: RecordDict) -> Instructions:
    """Decode a train/evaluate message as the client does."""
    record = content.config_records[CONFIG]
    return Instructions(
        config=run_config_from_record(record),
        server_round=int(record[SERVER_ROUND]),
        proximal_mu=float(record.get(PROXIMAL_MU, 0.0)),
    )


def encode_truth(inputs: np.ndarray, labels: np.ndarray) -> ConfigRecord:
    """Samples as raw bytes plus shape: ConfigRecords carry bytes, not arrays."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    return ConfigRecord(
        {
            "inputs": inputs.tobytes(),
            "labels": np.ascontiguousarray(labels, dtype=np.int64).tobytes(),
            "shape": [int(d) for d in inputs.shape],
        }
    )


def decode_truth(record: ConfigRecord) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(d) for d in record["shape"])
    inputs = np.frombuffer(record["inputs"], dtype=np.float32).reshape(shape)
    return inputs, np.frombuffer(record["labels"], dtype=np.int64)


def eval_metrics(loss: float, metrics: Mapping[str, float]) -> dict[str, float]:
    """Evaluation loss and each named metric under its reply key."""
    return {EVAL_LOSS: loss, **{f"{EVAL_PREFIX}{name}": value for name, value in metrics.items()}}


def eval_columns(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """eval-<name> reply keys as the run store's eval_<name> columns (loss and model metrics)."""
    return {
        f"eval_{key[len(EVAL_PREFIX) :]}": value
        for key, value in metrics.items()
        if key.startswith(EVAL_PREFIX)
    }


def encode_extra(payload: Mapping[str, float | int | np.ndarray]) -> ConfigRecord:
    """Scalars as they are, arrays as .npy bytes (dtype and shape inside, no pickle)."""
    record: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            record[key] = buffer.getvalue()
        else:
            record[key] = value
    return ConfigRecord(record)


def decode_extra(record: ConfigRecord) -> dict[str, float | int | np.ndarray]:
    return {
        key: np.load(io.BytesIO(value), allow_pickle=False) if isinstance(value, bytes) else value
        for key, value in record.items()
    }


def encode_privacy(defences: tuple[str, ...], spends: tuple[PrivacySpend, ...]) -> ConfigRecord:
    """The client's defence labels and each accounted mechanism's spend, flat."""
    record: dict[str, Any] = {DEFENCES: " ".join(defences)}
    for spend in spends:
        for key, value in asdict(spend).items():
            if key != "mechanism":
                record[f"{spend.mechanism}.{key}"] = value
    return ConfigRecord(record)


def decode_privacy(record: Mapping[str, Any]) -> tuple[str, list[PrivacySpend]]:
    """Inverse of `encode_privacy`; a missing or mistyped field raises (KeyError, TypeError)."""
    mechanisms = sorted({key.partition(".")[0] for key in record if "." in key})
    spends = []
    for mechanism in mechanisms:
        values: dict[str, Any] = {"mechanism": mechanism}
        for spec in fields(PrivacySpend):
            if spec.name != "mechanism":
                values[spec.name] = record[f"{mechanism}.{spec.name}"]
        spends.append(PrivacySpend(**values))
    return str(record.get(DEFENCES, "")), spends


def privacy_metrics(defences: tuple[str, ...], spends: tuple[PrivacySpend, ...]) -> dict[str, Any]:
    """The privacy record as clear-text metrics, `privacy.<key>`: a SecAgg+ reply is a legacy
    FitRes, whose only side channel next to the masked update is its metrics."""
    return {f"{PRIVACY}.{key}": value for key, value in encode_privacy(defences, spends).items()}


def privacy_from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `privacy_metrics` (empty when the client reported none)."""
    prefix = f"{PRIVACY}."
    return {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}
