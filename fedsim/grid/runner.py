"""Run a grid's cells in parallel, resume an interrupted grid, and keep compare.csv current.

Each cell is one `fedsim.launch.run` (its own simulation process, given `cpus_per_cell` cores so
Ray does not oversubscribe the machine) followed by its security report (its own process,
`fedsim.grid.security`); up to `jobs` cells run at once, each driven by a thread that mostly
waits on its child. After every finished cell compare.csv is rewritten atomically, rows in the
spec's cell order.

Resume: a cell whose row says ok, whose run directory holds the config the spec asks for, its
last round's checkpoint and its compare-cell.json is not touched. Otherwise: a run directory
with another config (the spec changed) or one `fedsim run --resume` refuses is removed and the
cell starts clean; a partial one continues from its last complete round; a finished run whose
security report is missing only computes that. A failing cell gets a `failed` row with its
one-line error and the others go on; a failed cell is retried by the next invocation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim import launch
from fedsim.errors import RunFailedError, UserInputError
from fedsim.grid.progress import CellProgress
from fedsim.grid.row import (
    COMPARE_FILE,
    OK,
    cell_row,
    failed_row,
    read_compare_csv,
    run_dir_of,
    write_compare_csv,
)
from fedsim.grid.security import CELL_FILE
from fedsim.grid.spec import Cell, GridSpec, describe
from fedsim.store.files import atomic_write
from fedsim.store.run_store import RunStore

PLAN_FILE = "cells.json"
# Cores one cell's simulation gets by default: its clients train one at a time on one of them,
# the server evaluates on the other.
CPUS_PER_CELL = 2
# The package root: the security process must import this same code.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent

Report = Callable[[Path], Path]


@dataclass
class GridOutcome:
    """What one invocation did: the rows (spec order) and which cells it ran or found done."""

    path: Path
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    report: Path | None = None
    report_error: str | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_jobs(cpus_per_cell: int) -> int:
    return max(1, available_cores() // cpus_per_cell)


def run_grid(
    grid: GridSpec,
    compare_dir: Path,
    *,
    jobs: int | None = None,
    cpus_per_cell: int = CPUS_PER_CELL,
    progress: CellProgress | None = None,
    report: Report | None = None,
    refused: Mapping[str, str] | None = None,
) -> GridOutcome:
    """Run every cell of `grid` not already done under `compare_dir`; see the module docstring.
    `refused` cells (a combination whose plan check failed: {id: reason}) get a failed row
    with their reason and are not run."""
    refused = refused or {}
    if isinstance(cpus_per_cell, bool) or not isinstance(cpus_per_cell, int) or cpus_per_cell < 1:
        raise UserInputError(f"--cpus-per-cell must be at least 1 (got {cpus_per_cell!r})")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UserInputError(
            f"--jobs must be at least 1 (got {jobs!r}); leave it out for cores // cpus-per-cell"
        )
    jobs = jobs or default_jobs(cpus_per_cell)
    csv_path = compare_dir / COMPARE_FILE
    try:
        compare_dir.mkdir(parents=True, exist_ok=True)
        existing = read_compare_csv(csv_path)
    except (OSError, ValueError) as err:
        raise UserInputError(
            f"cannot use {compare_dir} as a compare folder: {err}; pass another --out"
        ) from None
    plan = json.dumps(describe(grid.cells), indent=2) + "\n"
    atomic_write(compare_dir / PLAN_FILE, lambda tmp: Path(tmp).write_text(plan))
    rows: dict[str, dict[str, Any]] = {}
    outcome = GridOutcome(compare_dir, [])
    todo = []
    for cell in grid.cells:
        if cell.id in refused:
            rows[cell.id] = failed_row(cell, refused[cell.id])
            outcome.failed.append(cell.id)
        elif _is_done(cell, compare_dir, existing.get(cell.id)):
            rows[cell.id] = existing[cell.id]
            outcome.skipped.append(cell.id)
        else:
            todo.append(cell)
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            ordered = [rows[c.id] for c in grid.cells if c.id in rows]
            write_compare_csv(csv_path, ordered)

    flush()
    if progress is not None:
        for cell in grid.cells:
            status = "done earlier" if cell.id in outcome.skipped else "waiting"
            status = f"failed: {refused[cell.id]}" if cell.id in refused else status
            progress.add(cell.id, cell.config.rounds + 1, status)
            if status != "waiting":
                progress.update(cell.id, status=status, done=True)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cell") as pool:
        futures: dict[Future[dict[str, Any]], Cell] = {
            pool.submit(run_cell, cell, compare_dir, cpus_per_cell, progress): cell for cell in todo
        }
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    cell = futures[future]
                    rows[cell.id] = future.result()
                    outcome.ran.append(cell.id)
                    if rows[cell.id]["status"] != OK:
                        outcome.failed.append(cell.id)
                    flush()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    outcome.rows = [rows[c.id] for c in grid.cells]
    if report is not None:
        try:
            outcome.report = report(compare_dir)
        except Exception as err:  # the grid's numbers stand without their report
            outcome.report_error = f"{type(err).__name__}: {err}"
    return outcome


def _is_done(cell: Cell, compare_dir: Path, row: dict[str, str] | None) -> bool:
    """A cell with an ok row whose folder is its own, complete, with its security report."""
    if row is None or row.get("status") != OK:
        return False
    run_dir = run_dir_of(compare_dir, cell)
    return _complete(cell, run_dir) and (run_dir / CELL_FILE).is_file()


def _complete(cell: Cell, run_dir: Path) -> bool:
    store = _own_store(cell, run_dir)
    return store is not None and store.last_complete_round() == cell.config.rounds


def _own_store(cell: Cell, run_dir: Path) -> RunStore | None:
    """The cell's run folder if it holds the config the spec asks for, else None."""
    if not run_dir.is_dir():
        return None
    try:
        store = RunStore.open(run_dir)
        return store if store.config == cell.config else None
    except (UserInputError, OSError, ValueError):
        return None


def run_cell(cell: Cell, compare_dir: Path, cpus: int, progress: CellProgress | None) -> dict[str, Any]:
    """Run (or continue) one cell and return its row; any error becomes a failed row."""
    start = time.perf_counter()
    run_dir = run_dir_of(compare_dir, cell)

    def on_round(server_round: int, metrics: dict[str, float]) -> None:
        if progress is not None:
            accuracy = metrics.get("eval_accuracy")
            shown = f"round {server_round}" + (f": accuracy {accuracy:.3f}" if accuracy is not None else "")
            progress.update(cell.id, completed=server_round, status=shown)

    try:
        if progress is not None:
            progress.update(cell.id, completed=0, status="starting")
        if _complete(cell, run_dir) and (run_dir / CELL_FILE).is_file():
            security = json.loads((run_dir / CELL_FILE).read_text())  # finished before the row was written
        else:
            _federate(cell, run_dir, cpus, on_round)
            if progress is not None:
                progress.update(cell.id, completed=cell.config.rounds, status="security report")
            security = _security(run_dir)
            security["wall_s"] = time.perf_counter() - start
            text = json.dumps(security, indent=2) + "\n"
            atomic_write(run_dir / CELL_FILE, lambda tmp: Path(tmp).write_text(text))
        row = cell_row(cell, run_dir, security)
    except (UserInputError, RunFailedError) as err:
        row = failed_row(cell, str(err), time.perf_counter() - start)
    except Exception as err:  # one broken cell must not stop the grid; its row says what broke
        row = failed_row(cell, f"{type(err).__name__}: {err}", time.perf_counter() - start)
    if progress is not None:
        status = "ok" if row["status"] == OK else f"failed: {row['error']}"
        progress.update(cell.id, status=status, done=True)
    return row


def _federate(cell: Cell, run_dir: Path, cpus: int, on_round: launch.RoundCallback) -> None:
    """The cell's federation to its last round: kept, continued, or started clean."""
    store = _own_store(cell, run_dir)
    if store is None and run_dir.exists():
        shutil.rmtree(run_dir)  # another config (the spec changed) or not a run folder: start clean
    if store is not None:
        (run_dir / CELL_FILE).unlink(missing_ok=True)  # a report of an older model, if any
        try:
            launch.run(resume=run_dir, cpus=cpus, on_round=on_round)
            return
        except UserInputError:  # a folder `--resume` refuses (damaged): start the cell again
            shutil.rmtree(run_dir)
    launch.run(cell.config, runs_dir=run_dir.parent, cpus=cpus, on_round=on_round)


def _security(run_dir: Path) -> dict[str, Any]:
    """The security report of the final model, computed in its own process."""
    python_path = os.pathsep.join(p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fedsim.grid.security", str(run_dir.resolve())],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RunFailedError(
            f"security report failed: {lines[-1] if lines else f'exit code {result.returncode}'}"
        )
    return json.loads((run_dir / CELL_FILE).read_text())
