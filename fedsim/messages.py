"""The record keys that client and server agree on, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsim.config import RunConfig

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
# Side record with the sender's identity; strategies ignore ConfigRecords in replies, and the
# default metric aggregation would average an id sent as a metric.
CLIENT = "client"
PARTITION_ID = "partition-id"
ROSTER_QUERY = "query.roster"

TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
NUM_EXAMPLES = "num-examples"
SECONDS = "seconds"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"

_RUN_KEYS = frozenset(RunConfig().to_dict())


def run_config_from_record(record: Mapping[str, Any]) -> RunConfig:
    """The run config a server sent inside a train/evaluate ConfigRecord."""
    return RunConfig.from_mapping(
        {k: v for k, v in record.items() if k in _RUN_KEYS}, source="server message"
    )
