"""Run one federation in its own process and read its run folder back.

`fedsim.run` (and so `fedsim run`, `fedsim compare`'s cells and a notebook's repeated calls) lands
here: the config is validated and the run folder created in this process, the simulation runs in
a child (Flower's `run_simulation` is not safe twice in one process), and each finished round is
reported to `on_round` as the child writes it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from fedsim._worker import WARNING_PREFIX
from fedsim.config.run_config import RunConfig, check_text
from fedsim.errors import RunFailedError, UserInputError
from fedsim.federation.simulation import check_ray_address
from fedsim.plan.planning import validate_plan
from fedsim.plan.resume import open_for_resume
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.run_store import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, PLOT_FILE, RunStore
from fedsim.strategy.privacy_ledger import PRIVACY_FILE
from fedsim.training.local import metric_names

RoundCallback = Callable[[int, dict[str, float]], None]
ConfigLike = RunConfig | Mapping[str, Any] | str | os.PathLike[str]
PathLike = str | os.PathLike[str]

# How often the caller looks at the run folder for finished rounds (seconds).
POLL_SECONDS = 0.25
# The folder holding the `fedsim` package: the simulation process must import this same code.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
# Columns of a metrics.csv row that say which row it is rather than measure something.
_ROW_KEYS = ("round", "stage", "partition_id")


@dataclass(frozen=True)
class RunResult:
    """A run directory read back: its config, metrics and audit as DataFrames, and its files."""

    path: Path
    config: RunConfig
    metrics: pd.DataFrame  # metrics.csv: one row per (round, client, stage) plus a server row per round
    audit: pd.DataFrame | None  # audit.csv of an audited run, else None
    privacy: pd.DataFrame | None  # privacy.csv (ε per client and round) when DP spends budget, else None
    config_path: Path
    metrics_path: Path
    plot_path: Path | None
    audit_path: Path | None
    checkpoints: tuple[Path, ...]  # global model after each complete round, round 0 first
    rounds_run: int = 0  # rounds this call completed (0: loaded, or nothing was left to do)

    @classmethod
    def load(cls, path: PathLike, rounds_run: int = 0) -> RunResult:
        """Read a run directory (finished or not) written by `fedsim run` or `fedsim.run`."""
        store = RunStore.open(checked_path(path, "run directory"))
        audit_path = store.path / AUDIT_FILE
        privacy_path = store.path / PRIVACY_FILE
        plot_path = store.path / PLOT_FILE
        return cls(
            path=store.path,
            config=store.config,
            metrics=pd.read_csv(store.metrics_path),
            audit=pd.read_csv(audit_path) if audit_path.is_file() else None,
            privacy=pd.read_csv(privacy_path) if privacy_path.is_file() else None,
            config_path=store.path / CONFIG_FILE,
            metrics_path=store.path / METRICS_FILE,
            plot_path=plot_path if plot_path.is_file() else None,
            audit_path=audit_path if audit_path.is_file() else None,
            checkpoints=tuple(sorted((store.path / CHECKPOINTS).glob("round-????.safetensors"))),
            rounds_run=rounds_run,
        )

    @property
    def server(self) -> pd.DataFrame:
        """The global model's held-out scores, one row per round (round 0 = initial model)."""
        rows = self.metrics[self.metrics["stage"] == "server"].drop(columns=["stage", "partition_id"])
        return rows.dropna(axis="columns", how="all").reset_index(drop=True)  # e.g. train_loss

    @property
    def last_round(self) -> int:
        return int(self.server["round"].max())

    @property
    def final(self) -> dict[str, float]:
        """The last round's server metrics, e.g. {"eval_loss": ..., "eval_accuracy": ...}."""
        return _round_metrics(self.server.iloc[-1].to_dict())


def run(
    config: ConfigLike | None = None,
    *,
    runs_dir: PathLike = "runs",
    resume: PathLike | None = None,
    stop_after: int | None = None,
    cpus: int | None = None,
    ray_address: str | None = None,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run a federation and return its results.

    config: a RunConfig, a mapping of config keys (`{"clients": 4, "rounds": 3}`), a TOML/JSON
        file, or None for the defaults; must be None with `resume`.
    runs_dir: where `<config.name>/` is created. resume: a run directory to continue from its
        last complete round. stop_after: stop after this round (resume later).
    cpus: cores for the simulation (default all); ray_address: join a running Ray cluster.
    on_round: called in this process as `on_round(round, metrics)` after each complete round
        (round 0 is the initial model), metrics being the server row, e.g. eval_loss.
    verbose: show Flower's and Ray's logs on stderr.

    The simulation runs in a child process (Flower's `run_simulation` is not safe twice in one
    process), so calling `run` repeatedly, e.g. in a notebook, works.
    """
    _check_launch(stop_after, cpus, ray_address)
    store = _prepare_store(config, runs_dir, resume, stop_after)
    run_config = store.config
    done = store.last_complete_round()
    last = min(run_config.rounds, stop_after or run_config.rounds)
    if done is not None and done >= last:
        return RunResult.load(store.path)
    with tempfile.TemporaryDirectory(prefix="fedsim-run-") as tmp:
        report, log_path = Path(tmp) / "report.json", Path(tmp) / "simulation.log"
        with open(log_path, "wb") as log:
            process = _launch(store.path, report, log, stop_after, cpus, ray_address, verbose)
            _follow(process, store, done if done is not None else -1, on_round, log_path, verbose)
        if process.returncode != 0:
            raise _failure(process.returncode, report, log_path)
    return RunResult.load(store.path, rounds_run=(store.last_complete_round() or 0) - (done or 0))


def _check_launch(stop_after: int | None, cpus: int | None, ray_address: str | None) -> None:
    if stop_after is not None and stop_after < 1:
        raise UserInputError(f"--stop-after must be at least 1 (got {stop_after}); pass a round number")
    if cpus is not None and cpus < 1:
        raise UserInputError(f"--cpus must be at least 1 (got {cpus}); leave it out to use every core")
    if ray_address is not None:  # "" would quietly start a local cluster instead
        check_text("--ray-address", ray_address)
        check_ray_address(ray_address)


def _prepare_store(
    config: ConfigLike | None, runs_dir: PathLike, resume: PathLike | None, stop_after: int | None
) -> RunStore:
    """Validate everything, then create (or open, to resume) the run directory."""
    if resume is not None:
        if config is not None:
            raise UserInputError("resume continues a run with its saved config; pass no config with it")
        store = open_for_resume(checked_path(resume, "--resume"))
        _check_stop_after(stop_after, store.config)
        return store
    run_config = _as_config(config)
    validate_plan(run_config)
    _check_stop_after(stop_after, run_config)
    return RunStore.create(checked_path(runs_dir, "--runs-dir"), run_config, metric_names(run_config))


def _check_stop_after(stop_after: int | None, config: RunConfig) -> None:
    if stop_after is not None and stop_after > config.rounds:
        raise UserInputError(
            f"--stop-after {stop_after} is beyond the run's {config.rounds} rounds; "
            f"pass at most {config.rounds}, or raise --rounds"
        )


def _as_config(config: ConfigLike | None) -> RunConfig:
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return RunConfig.from_mapping(config)
    if not isinstance(config, str | os.PathLike):
        raise UserInputError(
            f"config must be a RunConfig, a mapping of config keys or a TOML/JSON file path, "
            f"got {type(config).__name__}; pass e.g. {{'rounds': 3}}"
        )
    return RunConfig.from_file(checked_path(config, "--config"))


def checked_path(value: PathLike, what: str) -> Path:
    """A path from the user; control characters (a NUL byte) are bad input, not an OS error."""
    check_text(what, os.fspath(value))
    return Path(value)


def _launch(
    run_dir: Path,
    report: Path,
    log: BinaryIO,
    stop_after: int | None,
    cpus: int | None,
    ray_address: str | None,
    verbose: bool,
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "fedsim._worker", str(run_dir.resolve()), "--report", str(report),
               "--parent", str(os.getpid())]  # fmt: skip
    for flag, value in (("--stop-after", stop_after), ("--cpus", cpus), ("--ray-address", ray_address)):
        if value is not None:
            command += [flag, str(value)]
    if verbose:
        command.append("--verbose")
    python_path = os.pathsep.join(p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}
    # A process group of its own, which the child's watchdog kills when the child is gone, so no
    # Ray helper outlives a killed run (see fedsim._worker).
    group = {"process_group": 0} if os.name == "posix" else {}
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, **group
    )


def _follow(
    process: subprocess.Popen[bytes],
    store: RunStore,
    reported: int,
    on_round: RoundCallback | None,
    log_path: Path,
    verbose: bool,
) -> None:
    """Call `on_round` for each round the child completes, in order, until it exits; stop the
    child if this process is interrupted or the callback raises."""
    log_offset = 0
    try:
        while True:
            finished = process.poll() is not None
            for server_round, metrics in _new_rounds(store, reported):
                reported = server_round
                if on_round is not None:
                    on_round(server_round, metrics)
            log_offset = _forward_log(log_path, log_offset, everything=verbose)
            if finished:
                return
            time.sleep(POLL_SECONDS)
    finally:
        if process.poll() is None:
            _stop(process)


def _new_rounds(store: RunStore, reported: int) -> Iterator[tuple[int, dict[str, float]]]:
    """Server rows of rounds after `reported` that are complete. A round is complete once its
    checkpoint exists (written after its rows), so rows of an interrupted round that a resumed
    run is about to drop are never reported."""
    complete = store.last_complete_round()
    if complete is None or complete <= reported:
        return
    try:
        text = store.metrics_path.read_text()
    except OSError:
        return
    text = text[: text.rfind("\n") + 1]  # a row being appended is not complete yet
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        with contextlib.suppress(TypeError, ValueError):
            if row.get("stage") == "server" and reported < int(row["round"]) <= complete:
                rows[int(row["round"])] = _round_metrics(row)
    yield from sorted(rows.items())


def _round_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The measured values of a metrics row (whatever columns the model reports), as floats."""
    metrics = {}
    for key, value in row.items():
        if key in _ROW_KEYS or value is None or value == "":
            continue
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
            if number == number:  # NaN cells are empty ones read by pandas
                metrics[key] = number
    return metrics


def _forward_log(log_path: Path, offset: int, everything: bool) -> int:
    """Copy the child's new complete log lines to stderr: all of them when verbose, else only
    fedsim's own warnings (a rejected update, clients that failed), which a user must see."""
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    chunk = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
    lines = chunk.decode(errors="replace").splitlines(keepends=True)
    shown = lines if everything else [line for line in lines if line.startswith(WARNING_PREFIX)]
    if shown:
        sys.stderr.write("".join(shown))
        sys.stderr.flush()
    return offset + len(chunk)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Interrupt the simulation as Ctrl-C would (Ray shuts down); kill it if it hangs."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _failure(returncode: int, report: Path, log_path: Path) -> Exception:
    """The child's own one-line error, as the exception type a caller expects."""
    log_tail = log_path.read_text(errors="replace")[-8000:] if log_path.exists() else ""
    try:
        outcome = json.loads(report.read_text())
    except (OSError, ValueError):
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else how
        return RunFailedError(
            f"the simulation process ended with {how} before reporting; "
            "rerun with --verbose (verbose=True) to see its log",
            details=log_tail,
        )
    if outcome["kind"] == "input":
        return UserInputError(outcome["message"])
    return RunFailedError(outcome["message"], details=outcome.get("details") or "")
