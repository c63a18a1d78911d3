"""Each client's data: its partition of the training split, cut into local train and validation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedsim.config.run_config import RunConfig
from fedsim.data.dataset import SPLIT_SEED, Dataset
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
    """This client's partition, split into local train and validation parts."""
    data = dataset_for(config)
    indices = _partitions(config)[partition_id]
    rng = np.random.default_rng([config.seed, partition_id])
    shuffled = rng.permutation(indices)
    n_val = max(1, int(len(shuffled) * LOCAL_VALIDATION_SHARE)) if len(shuffled) > 1 else 0
    val, train = shuffled[:n_val], shuffled[n_val:]
    if n_val == 0:
        val = train
    return ClientData(
        torch.from_numpy(data.x_train[train]),
        torch.from_numpy(data.y_train[train]),
        torch.from_numpy(data.x_train[val]),
        torch.from_numpy(data.y_train[val]),
    )
