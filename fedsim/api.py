"""fedsim's Python API: run a federation or audit a model from a script or a notebook.

    import fedsim
    result = fedsim.run({"clients": 4, "rounds": 3}, on_round=lambda r, m: print(r, m))
    result.server[["round", "eval_accuracy"]]          # the global model's learning curve
    report = fedsim.audit(model="cnn6", dataset="photos", samples=2)
    report.security, report.summary                     # per-layer ranks, per-attack scores

`fedsim run` and `fedsim audit` are thin layers over `run` and `audit`. Bad input raises
`UserInputError` before anything is written; a run that stops early raises `RunFailedError`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch

from audits.architecture_report import ArchitectureReport
from audits.engine import AUDIT_COLUMNS, AuditRow
from audits.report import summarise_audit
from audits.security_metric import SecurityReport
from audits.standalone import audit_model
from fedsim._worker import WARNING_PREFIX
from fedsim.config.run_config import RunConfig, check_text
from fedsim.data import load_dataset
from fedsim.errors import RunFailedError, UserInputError
from fedsim.federation.planning import check_attack_names, check_model_name, validate_plan
from fedsim.federation.simulation import check_ray_address
from fedsim.store.audit_folder import AUDIT_FILE, check_output_folder, load_weights, write_audit
from fedsim.store.resume_check import open_for_resume
from fedsim.store.run_store import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, PLOT_FILE, RunStore
from fedsim.strategy.privacy_ledger import PRIVACY_FILE
from fedsim.training.local import metric_names
from fedsim.training.run_model import build_run_model
from models import InputSpec, ZooModel
from models import model_options as model_options_of

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
        store = RunStore.open(_path(path, "run directory"))
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


@dataclass(frozen=True)
class AuditResult:
    """One model's leakage: the per-layer security table and each attack on each sample."""

    security: pd.DataFrame | None  # one row per Linear/Conv layer: unknowns, rank, deficit, ...
    security_report: SecurityReport | None  # the same with its score; None when not applicable
    security_error: str | None  # why the security metric does not apply to this model
    architecture: ArchitectureReport  # layer-wise metric, end-to-end rank, PSNR ceiling vs attacks
    rows: pd.DataFrame  # audit.csv's rows: one per (sample, attack)
    audit_rows: list[AuditRow]  # the same rows as the engine made them
    summary: pd.DataFrame  # one row per attack: mean PSNR / SSIM, label score, seconds
    inputs: np.ndarray  # the attacked samples, (N, C, H, W)
    labels: np.ndarray
    reconstructions: dict[str, list[np.ndarray | None]]  # per attack, per sample (None: declined)
    settings: dict[str, Any]
    path: Path | None = None  # the output folder, when `out` was given
    files: tuple[Path, ...] = field(default=())  # report.json, audit.csv, reconstructions.png


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


def _audited_model(model: str, spec: InputSpec, options: str, head: str) -> ZooModel:
    """The audited model with its options; `head` applies to the families that have one."""
    has_head = any(option.name == "head" for option in model_options_of(model))
    if not has_head and head != "ce":
        raise UserInputError(f"model {model!r} has no choice of head; drop --head {head}")
    return build_run_model(model, spec, options, **({"head": head} if has_head else {}))


def audit(
    *,
    model: str = "cnn6",
    dataset: str = "photos",
    samples: int = 4,
    attacks: str | Sequence[str] = "layerwise",
    weights: PathLike | None = None,
    seed: int = 0,
    out: PathLike | None = None,
    image_size: int = 0,
    head: str = "ce",
    gradient_noise: float = 0.0,
    model_options: str = "",
) -> AuditResult:
    """Audit one model's leakage without a federation: the security metric (per-layer rank of
    the layer-wise inversion systems) and each attack on the exact batch-1 gradient of
    `samples` test samples of `dataset`, drawn with `seed`.

    weights: a .safetensors file (e.g. a run checkpoint) to load; default a seeded initial model.
    out: a new folder to write report.json, audit.csv and reconstructions.png to; None keeps
        everything in memory. head: "ce" (softmax with bias) or "logistic" (R-GAP's one logit).
    gradient_noise: std of seeded Gaussian noise added to each entry of the gradient the attacks
        see (0: exact); the PSNR ceiling is computed at it (at 0: at the float32 rounding of a
        one-step weight delta, see `audits.architecture_report.ROUNDING_LEARNING_RATE`).
    model_options: the model's options as `fedsim run --model-options` takes them.
    """
    names = [a.strip() for a in attacks.split(",")] if isinstance(attacks, str) else list(attacks)
    names = [name for name in names if name]
    check_attack_names(names)
    checked = (
        ("model", model), ("model-options", model_options), ("dataset", dataset),
        ("image-size", image_size), ("seed", seed),
    )  # fmt: skip
    for key, value in checked:
        RunConfig.knob(key).check(value)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserInputError(f"--samples must be at least 1 (got {samples}); pass e.g. --samples 4")
    _check_gradient_noise(gradient_noise)
    check_model_name(model)
    data = load_dataset(dataset, image_size or None)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        net = _audited_model(model, data.spec, model_options, head)
    weights_path = None if weights is None else _path(weights, "weights")
    if weights_path is not None:
        load_weights(net, weights_path)
    folder = None if out is None else _path(out, "out")
    if folder is not None:
        check_output_folder(folder)
    chosen = np.random.default_rng(seed).choice(
        len(data.y_test), size=min(samples, len(data.y_test)), replace=False
    )
    inputs, labels = data.x_test[chosen], data.y_test[chosen]
    result = audit_model(
        net,
        inputs,
        labels,
        names,
        seed=seed,
        sample_ids=chosen,
        gradient_noise=gradient_noise,
        decode=None if data.tokenizer is None else data.tokenizer.decode,
    )
    settings = {
        "model": model,
        "dataset": dataset,
        "image_size": image_size,
        "head": head,
        "model_options": model_options,
        "seed": seed,
        "weights": str(weights_path) if weights_path else None,
        "samples": [int(i) for i in chosen],
        "gradient_noise": float(gradient_noise),
    }
    if folder is not None:
        write_audit(folder, result, settings)
    report = result.security.report
    return AuditResult(
        security=report.to_frame() if report is not None else None,
        security_report=report,
        security_error=None if report is not None else result.security.note,
        architecture=result.architecture,
        rows=pd.DataFrame([row.to_dict() for row in result.rows], columns=list(AUDIT_COLUMNS)),
        audit_rows=result.rows,
        summary=pd.DataFrame(summarise_audit(result.rows)),
        inputs=inputs,
        labels=labels,
        reconstructions=result.reconstructions,
        settings=settings,
        path=folder,
        files=tuple(sorted(folder.iterdir())) if folder is not None else (),
    )


def compare(
    spec: PathLike | Mapping[str, Any] | None = None,
    *,
    out: PathLike | None = None,
    models: Sequence[str] | None = None,
    defences: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    rounds: int | None = None,
    clients: int | None = None,
    jobs: int | None = None,
    cpus_per_cell: int | None = None,
    report: bool | Callable[[Path], Path] = True,
    progress: Any = None,
) -> pd.DataFrame:
    """Run a grid of models × defences (× datasets × seeds): one short federation with the
    auditor per cell, each cell's final model's security report, one row per cell (see
    `fedsim.compare.row.COLUMNS`) in `<out>/compare.csv`, returned as a DataFrame.

    spec: a TOML file or a mapping (`fedsim.compare.spec` documents the keys); None = the
        defaults. models/defences/datasets/seeds replace the spec's lists; rounds/clients set
        its `[run]` keys. out: the compare folder (default compare/<spec name>); running again
        on it resumes: finished cells are kept, not recomputed.
    jobs: cells at once (default cores // cpus_per_cell); cpus_per_cell: cores per simulation.
    report: True writes the HTML report at the end where `fedsim.compare.report` exists; a
        callable `report(compare_dir) -> path` is called instead; False writes none.
    progress: a `fedsim.compare.progress.CellProgress` (None: no progress display).

    Bad specs raise UserInputError before any cell runs; a failing cell is a `failed` row.
    The frame's `attrs` hold the folder (`path`) and which cells ran, were skipped, failed.
    """
    from fedsim.compare import runner
    from fedsim.compare import spec as grid_spec

    values: Mapping[str, Any]
    if spec is None:
        values = {}
    elif isinstance(spec, Mapping):
        values = spec
    else:
        values = grid_spec.read_spec_file(_path(spec, "compare spec"))
    overrides = {"models": models, "defences": defences, "datasets": datasets, "seeds": seeds,
                 "rounds": rounds, "clients": clients}  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, str):
            overrides[key] = grid_spec.parse_list(value)
    grid = grid_spec.build_grid(grid_spec.merge_overrides(values, overrides))
    refused = grid_spec.check_cells(grid)
    folder = _path(out, "--out") if out is not None else Path("compare") / grid.name
    writer = _report_writer() if report is True else (report or None)
    outcome = runner.run_grid(
        grid, folder, jobs=jobs, cpus_per_cell=cpus_per_cell or runner.CPUS_PER_CELL, progress=progress,
        report=writer, refused=refused,
    )  # fmt: skip
    from fedsim.compare.row import COMPARE_FILE

    frame = pd.read_csv(folder / COMPARE_FILE)  # typed as every reader of the file sees it
    frame.attrs.update(
        path=outcome.path, ran=outcome.ran, skipped=outcome.skipped, failed=outcome.failed,
        report=outcome.report, report_error=outcome.report_error,
    )  # fmt: skip
    return frame


def _report_writer() -> Callable[[Path], Path] | None:
    """`fedsim.compare.report.write_report` where that module is installed, else None."""
    try:
        from fedsim.compare.report import write_report  # type: ignore[import-not-found]
    except ModuleNotFoundError as err:
        if err.name != "fedsim.compare.report":
            raise  # the module is there but one of its own imports is missing: a real error
        return None
    return write_report


def _check_gradient_noise(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise UserInputError(
            f"--gradient-noise must be a finite number >= 0 (got {value}); pass 0 for the exact "
            "gradient or a noise std such as 0.001"
        )


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
        store = open_for_resume(_path(resume, "--resume"))
        _check_stop_after(stop_after, store.config)
        return store
    run_config = _as_config(config)
    validate_plan(run_config)
    _check_stop_after(stop_after, run_config)
    return RunStore.create(_path(runs_dir, "--runs-dir"), run_config, metric_names(run_config))


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
    return RunConfig.from_file(_path(config, "--config"))


def _path(value: PathLike, what: str) -> Path:
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
