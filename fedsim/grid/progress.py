"""A rich progress bar per cell of a grid: rounds, then the security report, then ok/failed.

Cells run in threads; rich's Progress takes its own lock, so each thread updates its own task.
When stderr is not a terminal, each event is one plain line instead.
"""

from __future__ import annotations

import sys
import threading

from rich.console import Console

from fedsim.progress import status_progress


class CellProgress:
    """Tasks keyed by cell id; `total` steps per cell = its rounds + 1 (the security report)."""

    def __init__(self, console: Console | None = None, plain: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.progress = status_progress(self.console, disable=self.plain)
        self.tasks: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> CellProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def add(self, cell: str, total: int, status: str = "waiting") -> None:
        self.tasks[cell] = self.progress.add_task(cell, total=total, status=status)
        self.totals[cell] = total

    def update(self, cell: str, completed: int | None = None, status: str = "", done: bool = False) -> None:
        task = self.tasks[cell]
        if done:
            completed = self.totals[cell]
        self.progress.update(task, completed=completed, status=status)
        if self.plain and status:
            with self.lock:
                self.console.print(f"{cell}: {status}", markup=False, highlight=False, soft_wrap=True)
