"""The run store: everything a run leaves in `runs/<name>/`.

- `config.json`: the resolved config;
- `metrics.csv`: one row per (round, client, stage), plus a `server` row per round; its
  columns are `metric_columns(model.metric_names)`, written when the run is created;
- `checkpoints/round-NNNN.safetensors`: the global model after each complete round (round 0 is
  the initial model) and, for stateful strategies, `round-NNNN.strategy.safetensors`;
- `metrics.png`: accuracy and loss per round.

A checkpoint is written last in a round, atomically, so the newest checkpoint marks the last
complete round; metrics rows after it belong to an interrupted round and are dropped on resume.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError
from fedsim.store.csv_log import CsvLog
from fedsim.store.files import atomic_write, staged_folder

# Server rows' privacy budget after the round: central DP's client-level ε, and the largest
# cumulative DP-SGD (sample-level) ε of any client; empty when the mechanism is off.
EPSILON_COLUMNS = ("epsilon_central", "epsilon_client_max")


def metric_columns(metric_names: Sequence[str]) -> tuple[str, ...]:
    """metrics.csv's header for a model with these evaluation metrics (classifiers: accuracy)."""
    evals = tuple(f"eval_{name}" for name in metric_names)
    return (
        "round", "partition_id", "stage", "train_loss", "eval_loss", *evals, "num_examples", "seconds",
        *EPSILON_COLUMNS,
    )  # fmt: skip


CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "metrics.png"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"round-(?P<round>[0-9]{4,})(?:\.(?P<kind>strategy))?\.safetensors")
# The hidden temp file of an `atomic_write` that a kill cut short (never renamed into place).
PARTIAL_CHECKPOINT_NAME = re.compile(r"\.round-[0-9]{4,}(?:\.strategy)?\.safetensors\.[A-Za-z0-9_]+")


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, root: Path, config: RunConfig, metric_names: Sequence[str]) -> RunStore:
        """Make `root/<name>` complete with config and header (one eval_ column per name of the
        model's `metric_names`), or fail without leaving anything."""
        final = root / config.name
        try:
            if final.exists():  # inside the try: a name too long for the OS raises here
                raise UserInputError(
                    f"run directory {final} already exists; "
                    f"pick another --name or continue it with --resume {final}"
                )
            root.mkdir(parents=True, exist_ok=True)
            with staged_folder(final) as staging:
                (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
                with open(staging / METRICS_FILE, "w", newline="") as handle:
                    csv.writer(handle, lineterminator="\n").writerow(metric_columns(metric_names))
                (staging / CHECKPOINTS).mkdir()
        except OSError as err:
            raise UserInputError(
                f"cannot create a run directory in {root} ({err.strerror}); pass a writable --runs-dir"
            ) from None
        return cls(final)

    @classmethod
    def open(cls, path: Path) -> RunStore:
        """A store over an existing run folder, unchecked: `fedsim.plan.resume.open_for_resume`
        checks it before a resume."""
        if not (path / CONFIG_FILE).is_file():
            raise UserInputError(f"{path} is not a fedsim run directory (no {CONFIG_FILE}); pass runs/<name>")
        return cls(path)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_file(self.path / CONFIG_FILE)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def columns(self) -> tuple[str, ...]:
        """metrics.csv's header as the run wrote it at creation."""
        try:
            with open(self.metrics_path, newline="") as handle:
                header = next(csv.reader(handle), None)
        except OSError:
            header = None
        if not header:
            raise UserInputError(
                f"{self.metrics_path} is missing or has no header; the run directory is damaged"
            )
        return tuple(header)

    def append_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        CsvLog(self.metrics_path, self.columns).append(rows)

    def read_rows(self) -> list[dict[str, str]]:
        with open(self.metrics_path, newline="") as handle:
            return list(csv.DictReader(handle))

    def drop_rows_after(self, last_round: int) -> None:
        """Forget rows of rounds after `last_round` (an interrupted round)."""
        CsvLog(self.metrics_path, self.columns).drop_rows_after(last_round)

    def checkpoint_path(self, server_round: int, kind: str = "") -> Path:
        suffix = f".{kind}" if kind else ""
        return self.path / CHECKPOINTS / f"round-{server_round:04d}{suffix}.safetensors"

    def save_checkpoint(
        self, server_round: int, state: Mapping[str, torch.Tensor], strategy_state: Mapping[str, np.ndarray]
    ) -> None:
        """Strategy state first, model last: the model file is the round's commit marker."""
        if strategy_state:
            atomic_write(
                self.checkpoint_path(server_round, "strategy"),
                lambda tmp: save_numpy({k: np.ascontiguousarray(v) for k, v in strategy_state.items()}, tmp),
            )
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(self.checkpoint_path(server_round), lambda tmp: save_file(tensors, tmp))

    def last_complete_round(self) -> int | None:
        """The newest round with a model checkpoint (its commit marker), or None for a new run."""
        folder = self.path / CHECKPOINTS
        names = (CHECKPOINT_NAME.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
        return max((int(m["round"]) for m in names if m and m["kind"] is None), default=None)

    def roll_back_to(self, last_round: int) -> None:
        """Forget what an interrupted round left behind: its metrics rows, a strategy file written
        before its model file, and temp files of writes a kill cut short."""
        self.drop_rows_after(last_round)
        for path in (self.path / CHECKPOINTS).iterdir():
            match = CHECKPOINT_NAME.fullmatch(path.name)
            if PARTIAL_CHECKPOINT_NAME.fullmatch(path.name) or (match and int(match["round"]) > last_round):
                path.unlink()

    def load_checkpoint(self, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """Model weights and strategy state; safetensors holds plain tensors, never pickled code."""
        state = load_file(self.checkpoint_path(server_round))
        strategy_file = self.checkpoint_path(server_round, "strategy")
        strategy_state = load_numpy(strategy_file) if strategy_file.exists() else {}
        return state, strategy_state


def state_fit_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Why saved tensors do not fit a model's state dict (names, shapes, float-ness); [] if they do."""
    problems = [f"missing {name}" for name in expected if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in expected]
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            continue
        if tuple(tensor.shape) != tuple(want.shape):
            problems.append(f"{name} has shape {list(tensor.shape)}, the model {list(want.shape)}")
        elif want.is_floating_point() and not tensor.is_floating_point():
            problems.append(f"{name} is {tensor.dtype}, the model {want.dtype}")
    return problems
