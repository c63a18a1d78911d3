"""Run the `fedsim` CLI as a user would (one simulation per process) and read what it wrote."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

FEDSIM = [sys.executable, "-m", "fedsim"]
# The repository root: where the packages, benchmarks, docs and notebooks live.
ROOT = Path(__file__).resolve().parents[2]


def run_fedsim(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`fedsim ARGS` in a fresh interpreter, as a user would type it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*FEDSIM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def final_server_accuracy(run_dir: Path) -> float:
    return float([r for r in read_metrics(run_dir) if r["stage"] == "server"][-1]["eval_accuracy"])
