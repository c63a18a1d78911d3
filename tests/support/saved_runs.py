"""Run folders made the cheap way (the run store's own writers, the run's own weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from audits.scoring.engine import AUDIT_COLUMNS
from fedsim.config.run_config import RunConfig
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.run_store import RunStore
from fedsim.training.local import model_for


def server_row(server_round: int) -> dict[str, object]:
    return {"round": server_round, "stage": "server", "eval_loss": 1.0, "eval_accuracy": 0.5,
            "num_examples": 360, "seconds": 0.1}  # fmt: skip


CONFIG = RunConfig(name="damaged", num_clients=2, rounds=3, local_epochs=1, audit=True, strategy="fedadam")


LAST = "checkpoints/round-0002.safetensors"


LAST_STRATEGY = "checkpoints/round-0002.strategy.safetensors"


def make_run(runs: Path) -> Path:
    """A run of 3 rounds stopped after round 2, as the run store writes it, in `runs/damaged`."""
    store = RunStore.create(runs, CONFIG, ("accuracy",))
    weights = model_for(CONFIG).state_dict()
    for server_round in range(3):
        rows = [{"round": server_round, "partition_id": pid, "stage": "train", "train_loss": 0.5,
                 "num_examples": 600, "seconds": 0.1} for pid in range(2) if server_round > 0]  # fmt: skip
        store.append_rows([*rows, server_row(server_round)])
        store.save_checkpoint(server_round, weights, fedadam_state(weights, 0.5 * server_round))
    (store.path / AUDIT_FILE).write_text(",".join(AUDIT_COLUMNS) + "\n")
    return store.path


def fedadam_state(weights: dict[str, torch.Tensor], value: float) -> dict[str, np.ndarray]:
    """FedAdam's server moments as the strategy chain checkpoints them (none before round 1)."""
    if not value:
        return {}
    return {f"aggregator/{moment}/{name}": np.full(tuple(tensor.shape), value)
            for moment in ("m_t", "v_t") for name, tensor in weights.items()}  # fmt: skip
