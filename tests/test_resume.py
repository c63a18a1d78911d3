"""`fedsim run --resume`: the run folder it reads, made the cheap way (the run store's own
writers, the run's own model weights) rather than by running a federation.

The damaged folders it refuses (one line, exit 2, the folder left as it was) are cases of
tests/test_bad_input_corpus.py, built on `make_run`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from audits.engine import AUDIT_COLUMNS
from fedsim.config.run_config import RunConfig
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.resume_check import open_for_resume
from fedsim.store.run_store import RunStore
from fedsim.training.local import model_for

CONFIG = RunConfig(name="damaged", num_clients=2, rounds=3, local_epochs=1, audit=True, strategy="fedadam")
LAST = "checkpoints/round-0002.safetensors"
LAST_STRATEGY = "checkpoints/round-0002.strategy.safetensors"


def _server_row(server_round: int) -> dict[str, object]:
    return {"round": server_round, "stage": "server", "eval_loss": 1.0, "eval_accuracy": 0.5,
            "num_examples": 360, "seconds": 0.1}  # fmt: skip


def make_run(runs: Path) -> Path:
    """A run of 3 rounds stopped after round 2, as the run store writes it, in `runs/damaged`."""
    store = RunStore.create(runs, CONFIG, ("accuracy",))
    weights = model_for(CONFIG).state_dict()
    for server_round in range(3):
        rows = [{"round": server_round, "partition_id": pid, "stage": "train", "train_loss": 0.5,
                 "num_examples": 600, "seconds": 0.1} for pid in range(2) if server_round > 0]  # fmt: skip
        store.append_rows([*rows, _server_row(server_round)])
        store.save_checkpoint(server_round, weights, fedadam_state(weights, 0.5 * server_round))
    (store.path / AUDIT_FILE).write_text(",".join(AUDIT_COLUMNS) + "\n")
    return store.path


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # so a stray write to ./runs would show
    return make_run(tmp_path / "runs")


def fedadam_state(weights: dict[str, torch.Tensor], value: float) -> dict[str, np.ndarray]:
    """FedAdam's server moments as the strategy chain checkpoints them (none before round 1)."""
    if not value:
        return {}
    return {f"aggregator/{moment}/{name}": np.full(tuple(tensor.shape), value)
            for moment in ("m_t", "v_t") for name, tensor in weights.items()}  # fmt: skip


def test_a_sound_folder_resumes_from_its_newest_checkpoint(run_dir: Path) -> None:
    store = open_for_resume(run_dir)
    assert store.last_complete_round() == 2 and store.config == CONFIG


def test_write_cut_short_by_a_kill_is_tolerated_and_cleaned(run_dir: Path) -> None:
    """A kill inside `atomic_write` leaves a hidden temp file and maybe the next round's strategy
    file (written before its model file): resume accepts both and removes them."""
    checkpoints = run_dir / "checkpoints"
    (checkpoints / ".round-0003.safetensors.k2j4_x").write_bytes(b"half")
    shutil.copy(run_dir / LAST_STRATEGY, checkpoints / "round-0003.strategy.safetensors")
    store = open_for_resume(run_dir)
    store.append_rows([_server_row(3)])  # a row of the interrupted round
    store.roll_back_to(store.last_complete_round() or 0)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "round-0000.safetensors",
        "round-0001.safetensors",
        "round-0001.strategy.safetensors",
        "round-0002.safetensors",
        "round-0002.strategy.safetensors",
    ]
    assert max(int(row["round"]) for row in store.read_rows()) == 2
