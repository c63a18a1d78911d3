"""End-to-end federations on real data, each simulation in its own `fedsim` process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import FEDSIM, final_server_accuracy, read_metrics, run_fedsim

pytestmark = pytest.mark.slow

SAMPLED = ["--clients", "5", "--fraction-train", "0.6", "--fraction-evaluate", "0.4", "--seed", "7"]


def _run(args: list[str], cwd: Path) -> None:
    result = run_fedsim(["run", *args], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_mlp_on_digits_reaches_85_percent(tmp_path: Path) -> None:
    _run(["--name", "mlp", "--clients", "5", "--rounds", "3"], tmp_path)
    run = tmp_path / "runs" / "mlp"
    assert final_server_accuracy(run) >= 0.85
    rows = read_metrics(run)
    assert {(r["round"], r["partition_id"]) for r in rows if r["stage"] == "train"} == {
        (str(rnd), str(pid)) for rnd in (1, 2, 3) for pid in range(5)
    }
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"round-000{i}.safetensors" for i in range(4)
    ]
    assert (run / "metrics.png").stat().st_size > 10_000
    assert (run / "config.json").read_text().count('"model": "mlp"') == 1


# FedAdam (server state) with client sampling: the hardest case for a resume. Local training of a
# second or so per round (4 epochs of batch 4) gives the kill test a round to land in.
FEDADAM = ["--strategy", "fedadam", "--server-learning-rate", "0.05", "--rounds", "4", *SAMPLED,
           "--local-epochs", "4", "--batch-size", "4", "--learning-rate", "0.05",
           "--momentum", "0"]  # fmt: skip


# The tests that read it share one pytest-xdist worker, so it runs once.
SHARES_FEDADAM_RUN = pytest.mark.xdist_group("fedadam-run")


@pytest.fixture(scope="module")
def fedadam_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted FedAdam run: the reference that the same-seed run, the run stopped and
    resumed, and the run killed and resumed must each reproduce exactly."""
    cwd = tmp_path_factory.mktemp("fedadam")
    _run(["--name", "straight", *FEDADAM], cwd)
    return cwd / "runs" / "straight"


@SHARES_FEDADAM_RUN
def test_same_seed_gives_identical_metrics_and_resume_matches_a_straight_run(
    fedadam_run: Path, tmp_path: Path
) -> None:
    """A second run with the same seed, and one stopped after round 2 and resumed: both
    reproduce the straight run's metrics (the resumed one its final weights too)."""
    _run(["--name", "b", *FEDADAM], tmp_path)
    _run(["--name", "c", *FEDADAM, "--stop-after", "2"], tmp_path)
    runs = tmp_path / "runs"
    assert (runs / "c" / "checkpoints" / "round-0002.safetensors").exists()
    assert not (runs / "c" / "checkpoints" / "round-0003.safetensors").exists()
    _run(["--resume", str(runs / "c")], tmp_path)

    first, second = read_metrics(fedadam_run), read_metrics(runs / "b")
    assert _without_timing(first) == _without_timing(second)
    trained = {r["partition_id"] for r in first if r["stage"] == "train" and r["round"] == "1"}
    assert len(trained) == 3, "fraction-train 0.6 of 5 clients trains 3 per round"

    straight = load_file(fedadam_run / "checkpoints" / "round-0004.safetensors")
    resumed = load_file(runs / "c" / "checkpoints" / "round-0004.safetensors")
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight), "resumed weights differ"
    assert _without_timing(read_metrics(runs / "c")) == _without_timing(first)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("fedprox", ["--proximal-mu", "0.1"]),
        ("krum", ["--num-malicious", "1"]),
        ("fedmedian", []),
        ("fedtrimmedavg", ["--trim-beta", "0.2"]),
    ],
)
def test_robust_and_proximal_strategies_learn(strategy: str, options: list[str], tmp_path: Path) -> None:
    _run(["--name", strategy, "--strategy", strategy, *options, "--clients", "5", "--rounds", "2",
          "--fraction-evaluate", "0"], tmp_path)  # fmt: skip
    assert final_server_accuracy(tmp_path / "runs" / strategy) >= 0.6


def test_cnn6_federation_on_32px_fashion_mnist(tmp_path: Path) -> None:
    from fedsim.data.idx import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("optional dataset missing; install it with: apt-get install -y dataset-fashion-mnist")
    _run(["--name", "cnn6", "--model", "cnn6", "--dataset", "fashion-mnist", "--image-size", "32",
          "--partitioner", "dirichlet", "--alpha", "0.5", "--clients", "50", "--fraction-train", "0.04",
          "--fraction-evaluate", "0", "--rounds", "2", "--learning-rate", "0.02", "--local-epochs", "1"],
         tmp_path)  # fmt: skip
    rows = read_metrics(tmp_path / "runs" / "cnn6")
    losses = [float(r["train_loss"]) for r in rows if r["stage"] == "train"]
    assert losses and all(loss == loss and loss < 10 for loss in losses), "NaN or exploding loss"
    server = [r for r in rows if r["stage"] == "server"]
    assert float(server[-1]["eval_loss"]) < float(server[0]["eval_loss"]), "server test loss did not fall"
    assert final_server_accuracy(tmp_path / "runs" / "cnn6") > 0.15  # chance is 0.10


@SHARES_FEDADAM_RUN
def test_resume_after_sigkill_mid_round(fedadam_run: Path, tmp_path: Path) -> None:
    """`fedsim run` SIGKILLed (with its process group) while a round after round 1 trains: its worker
    and Ray cluster go with it, and `--resume`
    redoes that round and ends exactly where an uninterrupted run ends.

    Each round lasts about as long as its local training (a second or so here). The kill lands
    after round 1 and, under any load, long before round 4 ends."""
    killed = tmp_path / "runs" / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [*FEDSIM, "run", "--name", "killed", *FEDADAM],
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches every Ray process
        )
    try:
        group = _kill_after_round_one(process, killed)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    _, alive = psutil.wait_procs(group, timeout=30)
    assert not alive, f"processes survived the kill: {alive}"
    assert not [p for p in psutil.process_iter() if _group_of(p) == process.pid], "group still alive"
    # (a hidden temp file would be a checkpoint write the kill cut short: resume removes it)
    kept = sorted(p.name for p in (killed / "checkpoints").glob("round-*"))
    assert kept[:2] == ["round-0000.safetensors", "round-0001.safetensors"]
    assert "round-0004.safetensors" not in kept, "the run had finished before the kill"

    _run(["--resume", str(killed)], tmp_path)
    rows = read_metrics(killed)
    keys = [(r["round"], r["partition_id"], r["stage"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows after the resume"
    assert [r["round"] for r in rows if r["stage"] == "server"] == ["0", "1", "2", "3", "4"]
    assert _without_timing(rows) == _without_timing(read_metrics(fedadam_run))
    straight = load_file(fedadam_run / "checkpoints" / "round-0004.safetensors")
    resumed = load_file(killed / "checkpoints" / "round-0004.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "resumed weights differ"


def _kill_after_round_one(process: subprocess.Popen[bytes], run: Path) -> list[psutil.Process]:
    """SIGKILL the process group while round 2 (or, under heavy load, round 3) trains; the processes
    the group held.

    Round 1's checkpoint is the last thing round 1 writes (Flower goes straight on to round 2's
    training), so a later round is under way once it exists; waiting a third of round 1's training
    time puts the kill inside training. Should round 2 finish meanwhile, the kill lands in round 3,
    which the test accepts: what it checks is a kill inside some round that a resume must redo."""
    checkpoint = run / "checkpoints" / "round-0001.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, f"fedsim exited early ({process.returncode})"
        assert time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.02)
    train_seconds = [float(r["seconds"]) for r in read_metrics(run) if r["stage"] == "train"]
    time.sleep(max(train_seconds) / 3)
    # The simulation's worker leads a process group of its own (Ray's helpers in it); killing the
    # CLI's group must still take it all down: the worker dies with its parent, and its
    # watchdog kills the worker's group.
    cli = psutil.Process(process.pid)
    group = [cli, *cli.children(recursive=True)]
    assert {"raylet", "gcs_server"} & {p.name() for p in group}, "no Ray cluster under the CLI"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return group


def _group_of(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
