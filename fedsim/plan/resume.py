"""The checks `--resume` runs on a run folder before anything starts.

A run folder outlives the process that wrote it: a disk fills up, a file is copied half, edited
by hand or replaced. Resuming from such a folder used to crash with a traceback, or worse, to go
on quietly (an empty config resumed with the defaults; no checkpoint restarted from round 0 and
duplicated rows). Every check here only reads, so a refusal leaves the folder as it was; each
failure is one UserInputError that names the file and the fix.

What resume relies on, and so what is checked:
- `config.json`: a JSON object with every RunConfig key (no silent defaults), valid, naming
  this folder;
- `checkpoints/`: only `round-NNNN.safetensors` and `round-NNNN.strategy.safetensors` files
  (plus the hidden temp files of a write a kill interrupted); the newest model checkpoint
  readable as safetensors (never unpickled), with exactly the model's tensor names and shapes,
  all finite, and its strategy state readable and finite;
- `metrics.csv` (and `audit.csv` when the run audits, `faults.csv` when present): a header
  with the columns resume rewrites, and rows whose `round` is an integer, since resume drops rows by round.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from audits.scoring.engine import AUDIT_COLUMNS
from fedsim.config.run_config import RunConfig
from fedsim.data import available_datasets
from fedsim.errors import UserInputError
from fedsim.plan.planning import check_attack_names, check_model_name, validate_plan
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.fault_log import FAULT_COLUMNS, FAULTS_FILE
from fedsim.store.run_store import (
    CHECKPOINT_NAME,
    CHECKPOINTS,
    CONFIG_FILE,
    METRICS_FILE,
    PARTIAL_CHECKPOINT_NAME,
    RunStore,
    state_fit_problems,
)
from fedsim.strategy.chain import checkpoint_state_shapes
from fedsim.strategy.privacy_ledger import PRIVACY_COLUMNS, PRIVACY_FILE
from fedsim.training.local import model_for
from models.base import federated_state

START_AGAIN = "delete the run folder and start again"
# Columns the federation writes whatever the model: resume drops rows by `round`, and a header
# without these was not written by fedsim. (Model metric columns vary per run; they are read from
# the file's own header.)
CORE_METRIC_COLUMNS = ("round", "partition_id", "stage", "num_examples", "seconds")
ROUND_CELL = re.compile(r"[0-9]+")


def open_for_resume(path: Path) -> RunStore:
    """The run store at `path`, once every file resume reads has been checked (see module doc)."""
    store = RunStore.open(path)
    config = check_config(path)
    check_checkpoints(path / CHECKPOINTS, config)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise UserInputError(f"{metrics} is missing; restore it or {START_AGAIN}")
    check_csv(metrics, CORE_METRIC_COLUMNS, exact=False)
    audit = path / AUDIT_FILE
    if config.audit and audit.exists():
        check_csv(audit, AUDIT_COLUMNS, exact=True)
    privacy = path / PRIVACY_FILE
    if privacy.exists():
        check_csv(privacy, PRIVACY_COLUMNS, exact=True)
    faults = path / FAULTS_FILE
    if faults.exists():
        check_csv(faults, FAULT_COLUMNS, exact=True)
    return store


def check_config(path: Path) -> RunConfig:
    """The saved config, complete and valid: a missing key must not fall back to a default."""
    file = path / CONFIG_FILE
    restore = f"restore it or {START_AGAIN}"
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserInputError(f"cannot read {file} ({err.strerror}); {restore}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise UserInputError(f"{file} is not valid JSON ({_first_line(err)}); {restore}") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{file} is not a JSON object of config keys; {restore}")
    field_of = {key: spec.name for spec in RunConfig.knobs() for key in spec.keys}
    present = {field_of.get(str(key)) for key in values}
    missing = [spec.key for spec in RunConfig.knobs() if spec.name not in present]
    if missing:
        raise UserInputError(f"{file} lacks {', '.join(missing)} (resume never fills in defaults); {restore}")
    try:
        config = RunConfig.from_mapping(values, source=str(file))
        config.validate()
        check_model_name(config.model)
        if config.dataset not in available_datasets():
            raise UserInputError(f"unknown dataset {config.dataset!r}")
        if config.audit:
            check_attack_names(config.attack_names())
    except UserInputError as err:
        problem = str(err).split("; ")[0]
        raise UserInputError(f"{file} is not a valid run config: {problem}; {restore}") from None
    # What is left depends on this machine too (an optional dataset may not be installed here):
    # those errors keep their own fix.
    validate_plan(config)
    folder = path.resolve().name
    if config.name != folder:
        raise UserInputError(
            f"{file} names run {config.name!r} but the folder is {folder!r}; "
            f"rename the folder back to {config.name!r} or restore its config.json"
        )
    return config


def check_checkpoints(folder: Path, config: RunConfig) -> int:
    """The newest complete round, once its checkpoint is known to fit the model; raises otherwise."""
    if not folder.is_dir():
        raise UserInputError(f"{folder} is missing; restore it or {START_AGAIN}")
    rounds = []
    for entry in sorted(folder.iterdir()):
        if PARTIAL_CHECKPOINT_NAME.fullmatch(entry.name) and entry.is_file():
            continue  # a write cut short by a kill; resume removes it
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file():
            raise UserInputError(
                f"{entry} is not a checkpoint (expected round-NNNN.safetensors or "
                f"round-NNNN.strategy.safetensors); move it out of {folder}"
            )
        if match["kind"] is None:
            rounds.append(int(match["round"]))
    if not rounds:
        raise UserInputError(
            f"{folder} holds no model checkpoint, so resume cannot tell where the run stopped; "
            f"restore {folder.name}/round-NNNN.safetensors or {START_AGAIN}"
        )
    rounds.sort()
    newest = rounds[-1]
    fix = (
        f"delete {folder.name}/round-{newest:04d}.* to resume from round {rounds[-2]}, or {START_AGAIN}"
        if len(rounds) > 1
        else START_AGAIN
    )
    model_file = folder / f"round-{newest:04d}.safetensors"
    model_state = _read_safetensors(model_file, load_file, fix)
    _check_model_state(model_file, model_state, config, fix)
    _check_strategy_state(
        folder / f"round-{newest:04d}.strategy.safetensors", newest, model_state, config, fix
    )
    return newest


def _check_strategy_state(
    file: Path, newest: int, model_state: dict[str, torch.Tensor], config: RunConfig, fix: str
) -> None:
    """The strategy chain's state (e.g. FedAdam's moments): present when the chain keeps any,
    with exactly its keys and shapes, finite. A missing file would resume with fresh moments
    and drift from a straight run; wrong shapes would crash a round later."""
    expected = checkpoint_state_shapes(config, {n: tuple(t.shape) for n, t in model_state.items()}, newest)
    state = _read_safetensors(file, load_numpy, fix) if file.exists() else {}
    found = {key: tuple(array.shape) for key, array in state.items()}
    # A None shape grows with the rounds (a ledger, an accountant's JSON): only its key is checked.
    mismatched = [k for k in found if k in expected and expected[k] is not None and found[k] != expected[k]]
    if set(found) != set(expected) or mismatched:
        wrong = sorted(set(found) ^ set(expected)) or sorted(mismatched)
        what = f"{file}" if file.exists() else f"{file} (missing)"
        raise UserInputError(
            f"{what} does not hold the {config.strategy} strategy's state "
            f"(first difference: {wrong[0]}); {fix}"
        )
    for name, array in state.items():
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise UserInputError(f"{file} holds non-finite values in {name}; {fix}")


def _read_safetensors(file: Path, load: Callable[[Path], dict[str, Any]], fix: str) -> dict[str, Any]:
    """safetensors only: plain tensors and a JSON header, so a pickled file is refused, never run."""
    try:
        return load(file)
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise UserInputError(
            f"{file} is not a readable safetensors file ({_first_line(err)}); {fix}"
        ) from None


def _check_model_state(file: Path, state: dict[str, torch.Tensor], config: RunConfig, fix: str) -> None:
    problems = state_fit_problems(state, federated_state(model_for(config)))
    if problems:
        shown = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserInputError(f"{file} does not fit the run's {config.model} model ({shown}); {fix}")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"{file} holds non-finite values in {name}; {fix}")


def check_csv(file: Path, columns: Sequence[str], exact: bool) -> None:
    """A header holding `columns` (exactly them when `exact`), and rows that fit it with an
    integer `round`: resume rewrites the file keeping rows up to the last complete round."""
    restore = f"restore it or {START_AGAIN}"
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise UserInputError(f"{file} is empty (no header); {restore}")
            _check_header(file, header, columns, exact, restore)
            where = header.index("round")
            for row in reader:
                if not row:
                    continue  # csv.DictReader skips blank lines too
                line = reader.line_num
                if len(row) != len(header):
                    raise UserInputError(
                        f"{file} line {line} has {len(row)} fields, the header {len(header)}; {restore}"
                    )
                if not ROUND_CELL.fullmatch(row[where]):
                    raise UserInputError(
                        f"{file} line {line}: round {row[where]!r} is not a number; {restore}"
                    )
    except OSError as err:
        raise UserInputError(f"cannot read {file} ({err.strerror}); {restore}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserInputError(f"{file} is not a readable CSV file ({_first_line(err)}); {restore}") from None


def _check_header(file: Path, header: list[str], columns: Sequence[str], exact: bool, restore: str) -> None:
    if exact and tuple(header) != tuple(columns):
        raise UserInputError(f"{file} header is not {','.join(columns)}; {restore}")
    missing = [column for column in columns if column not in header]
    if missing:
        raise UserInputError(f"{file} header lacks {', '.join(missing)}; {restore}")
    if len(set(header)) != len(header) or "" in header:
        raise UserInputError(f"{file} header has blank or repeated columns; {restore}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
