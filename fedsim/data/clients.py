"""Each client's data: its partition of the training split, cut into local train and validation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedsim.config.run_config import RunConfig
from fedsim.data.dataset import SPLIT_SEED, Dataset
from fedsim.data.node_file import load_node_samples
from fedsim.data.partition import partition
from fedsim.data.registry import load_dataset

# Share of each client's partition held out for federated evaluation.
LOCAL_VALIDATION_SHARE = 0.1


@dataclass(frozen=True)
class ClientData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def dataset_for(config: RunConfig) -> Dataset:
    return load_dataset(config.dataset, config.image_size or None)


def server_test_split(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The test samples the server scores the global model on: the whole test split, or
    `server_eval_samples` of it drawn once with SPLIT_SEED (the same subset every round, run and
    resume, whatever order the split is stored in)."""
    data = dataset_for(config)
    x, y = data.x_test, data.y_test
    if 0 < config.server_eval_samples < len(y):
        keep = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(y))[: config.server_eval_samples])
        x, y = x[keep], y[keep]
    return torch.from_numpy(x), torch.from_numpy(y)


@lru_cache(maxsize=2)
def _partitions(config: RunConfig) -> list[np.ndarray]:
    data = dataset_for(config)
    return partition(data.y_train, config.partition_spec(), data.covariate_train)


def client_data(config: RunConfig, partition_id: int) -> ClientData:
    """This client's partition, split into local train and validation parts.

    Only this partition's samples are copied out. The split itself needs every label (Dirichlet
    and pathological splits are global), so the node loads the run's dataset, which every
    registered dataset ships inside a package; the other partitions exist only as index arrays."""
    data = dataset_for(config)
    indices = _partitions(config)[partition_id]
    train, val = _local_split(config, partition_id, indices)
    return ClientData(
        torch.from_numpy(data.x_train[train]),
        torch.from_numpy(data.y_train[train]),
        torch.from_numpy(data.x_train[val]),
        torch.from_numpy(data.y_train[val]),
    )


def node_file_data(config: RunConfig, partition_id: int, path: Path) -> ClientData:
    """A deployed node's own samples (node config `data-path`), checked against the run's
    dataset spec and split like a partition (seeded by run seed and `partition_id`)."""
    spec = dataset_for(config).spec  # the model is built for this spec; the file must match it
    x, y = load_node_samples(path, spec, config.dataset)
    train, val = _local_split(config, partition_id, np.arange(len(y)))
    return ClientData(
        torch.from_numpy(x[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(x[val]),
        torch.from_numpy(y[val]),
    )


def _local_split(config: RunConfig, partition_id: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle a client's indices (run seed, partition id) and hold LOCAL_VALIDATION_SHARE out."""
    rng = np.random.default_rng([config.seed, partition_id])
    shuffled = rng.permutation(indices)
    n_val = max(1, int(len(shuffled) * LOCAL_VALIDATION_SHARE)) if len(shuffled) > 1 else 0
    val, train = shuffled[:n_val], shuffled[n_val:]
    if n_val == 0:
        val = train
    return train, val
