"""Linear regions of a run's global model over its rounds, read from the run's checkpoints.

`audits.security.linear_regions` counts the regions of one network near the data; this reads a run
directory (`runs/<name>/checkpoints/round-NNNN.safetensors`, round 0 the initial model), builds
the run's model for the run's dataset, and counts each round's regions on the same test samples,
segments and planes, so the rows differ only by the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from audits.security.linear_regions import RegionSettings, regions_over_rounds
from fedsim.data.clients import dataset_for
from fedsim.errors import UserInputError
from fedsim.store.run_store import CHECKPOINT_NAME, CHECKPOINTS, RunStore
from fedsim.training.local import model_for


def checkpoint_rounds(store: RunStore) -> list[int]:
    """The rounds with a model checkpoint, in order."""
    folder = store.path / CHECKPOINTS
    names = (CHECKPOINT_NAME.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return sorted(int(m["round"]) for m in names if m and m["kind"] is None)


def run_linear_regions(
    run_dir: str | Path, samples: int = 6, settings: RegionSettings | None = None
) -> list[dict[str, Any]]:
    """One row per checkpointed round: region counts on segments and planes through `samples`
    test samples drawn with `settings.seed`, and the run's server accuracy after that round."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise UserInputError(f"samples must be at least 2 (got {samples!r}); pass e.g. samples=6")
    settings = settings or RegionSettings()
    store = RunStore.open(Path(run_dir))
    config = store.config
    rounds = checkpoint_rounds(store)
    if not rounds:
        raise UserInputError(f"{store.path} has no checkpoints; run it first with fedsim run")
    data = dataset_for(config)
    model = model_for(config, data)
    chosen = np.random.default_rng(settings.seed).choice(
        len(data.y_test), size=min(samples, len(data.y_test)), replace=False
    )
    points = torch.from_numpy(np.ascontiguousarray(data.x_test[chosen]))
    accuracy = _server_accuracy(store)
    states = ((r, store.load_checkpoint(r)[0]) for r in rounds)
    rows = regions_over_rounds(model, states, points, settings)
    for row in rows:
        row["accuracy"] = accuracy.get(row["round"])
    return rows


def _server_accuracy(store: RunStore) -> dict[int, float]:
    """The server's evaluation accuracy per round, where metrics.csv has it."""
    out = {}
    for row in store.read_rows():
        value = row.get("eval_accuracy", "")
        if row.get("stage") == "server" and value not in ("", None):
            out[int(row["round"])] = float(value)
    return out
