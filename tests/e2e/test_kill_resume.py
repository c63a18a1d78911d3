"""SIGKILL the process running the ServerApp mid-round, then `--resume`: the final model equals an
uninterrupted run's bit for bit, and no Ray or Flower process of the killed run is left."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import FEDSIM, run_fedsim

# 10 local epochs: a round long enough (seconds) that the kill lands inside round 2.
ARGS = ["--clients", "2", "--rounds", "3", "--local-epochs", "10", "--fraction-evaluate", "0", "--seed", "5"]
LIMIT = 1200  # seconds per run: minutes each on a loaded 2-core machine
TAG = "FEDSIM_KILL_TEST"  # an environment variable every process of the run inherits


def tagged_processes(tag: str) -> dict[int, str]:
    """pid → command line of every live process whose environment carries this test's tag:
    the CLI, its worker, Ray's GCS, raylet, agents and actors (they inherit the environment)."""
    found = {}
    marker = f"{TAG}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is dead; only its parent's wait is pending
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def wait_until_gone(tag: str, seconds: float) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "round-0003.safetensors")


def metrics_without_times(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="scans /proc for the run's processes")
def test_sigkill_mid_round_then_resume_equals_a_straight_run(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag, "PYTHONUNBUFFERED": "1"}
    straight = run_fedsim(["run", "--name", "straight", *ARGS], cwd=tmp_path, timeout=LIMIT)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "runs" / "killed"
    cli = subprocess.Popen(
        [*FEDSIM, "run", "--name", "killed", *ARGS], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + LIMIT
        workers: list[int] = []
        while not workers:  # the process that runs the ServerApp (and drives Ray)
            assert cli.poll() is None and time.monotonic() < deadline, "the run ended early"
            workers = [pid for pid, command in tagged_processes(tag).items() if "fedsim._worker" in command]
            time.sleep(0.2)
        committed = run / "checkpoints" / "round-0001.safetensors"
        while not committed.exists():
            assert cli.poll() is None and time.monotonic() < deadline, "the run ended before round 1"
            time.sleep(0.02)
        # Round 2 starts as soon as round 1's checkpoint is written.
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 1 and "ended with signal SIGKILL" in stderr, stderr[-3000:]
    assert not (run / "checkpoints" / "round-0002.safetensors").exists(), "round 2 was not in flight"
    left = wait_until_gone(tag, seconds=15)
    assert not left, f"processes of the killed run are still alive: {left}"

    resumed = subprocess.run(
        [*FEDSIM, "run", "--resume", str(run)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=LIMIT, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not wait_until_gone(tag, seconds=15)
    expected, got = final_weights(tmp_path / "runs" / "straight"), final_weights(run)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert metrics_without_times(run) == metrics_without_times(tmp_path / "runs" / "straight")
