"""Crash-safe file writes shared by the run store and the audit log.

A run can be killed at any moment and resumed; every rewrite therefore goes through a temp file
in the same folder and a rename, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def default_mode(base: int) -> int:
    """`base` (0o666 files, 0o777 folders) less the umask: what open()/mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then rename the temp file over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(0o666))  # mkstemp makes owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside `final`, renamed to `final` once the block succeeds
    and removed if it fails: the folder appears complete or not at all."""
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield staging
        os.chmod(staging, default_mode(0o777))  # mkdtemp makes owner-only folders
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def drop_csv_rows_after(path: Path, columns: Sequence[str], last_round: int) -> None:
    """Atomically keep only the rows of rounds up to `last_round` (drop an interrupted round)."""
    with open(path, newline="") as handle:
        kept = [row for row in csv.DictReader(handle) if int(row["round"]) <= last_round]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)

    atomic_write(path, write)
