"""The one progress-bar layout of fedsim's CLI: a run's rounds and a compare grid's cells alike."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def status_progress(console: Console, disable: bool) -> Progress:
    """Description, bar, done/total, a free-text `status` field and elapsed time; `disable` when
    stderr is no terminal (the caller prints plain lines instead)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
    )
