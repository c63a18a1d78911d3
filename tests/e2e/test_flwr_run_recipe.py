"""The `flwr run .` recipe of the how-to page (docs/how-to/flwr-run.md) works exactly as written,
from a shell whose PATH does not hold the venv, and its last line stops the SuperLink (and
everything it started) by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.support.deployment import VENV_BIN, copy_app, processes_naming
from tests.support.docs import DOCS, fenced_blocks

# The recipe's SuperLink listens on Flower's fixed local port, like tests/e2e/test_flwr_run.py's.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flwr-superlink")]

LOCAL_PORT = 39091
PID_LINE = "SUPERLINK_PID=$!"
PAGE = DOCS / "how-to" / "flwr-run.md"


def recipe() -> str:
    """The page's first bash block that starts the SuperLink by PID and runs `flwr run .`."""
    for block in fenced_blocks(PAGE, "bash"):
        if PID_LINE in block.code and "flwr run ." in block.code:
            return block.code
    raise AssertionError(f"no `flwr run .` recipe with SUPERLINK_PID in {PAGE}")


def test_the_recipe_is_on_its_page() -> None:
    script = recipe()
    assert script.startswith('export PATH="$PWD/.venv/bin:$PATH"') and script.rstrip().endswith(
        "kill $SUPERLINK_PID   # its SuperExec and app processes exit with it"
    )


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _still_running(pid: int | None) -> bool:
    """Whether the SuperLink outlives the recipe: given a minute to act on `kill`'s SIGTERM, then
    stopped with its descendants by PID (and reported)."""
    if pid is None or not psutil.pid_exists(pid):
        return False
    superlink = psutil.Process(pid)
    tree = [superlink, *superlink.children(recursive=True)]
    _, alive = psutil.wait_procs([superlink], timeout=60)
    if alive:
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        psutil.wait_procs(tree, timeout=30)
    return bool(alive)


def test_the_flwr_run_recipe_works_as_written(tmp_path: Path) -> None:
    script = recipe()
    app = copy_app(tmp_path / "app")
    (app / ".venv").symlink_to(VENV_BIN.parent)  # a fresh checkout with its venv in .venv
    pid_file = tmp_path / "superlink.pid"
    # The one addition: record the PID the recipe holds, so the test can stop it if a line fails.
    script = script.replace(PID_LINE, f'{PID_LINE}\necho "$SUPERLINK_PID" > {pid_file}')
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    # mktemp -d (FLWR_HOME) and Ray's session land in a short private folder: Ray's socket paths
    # under a long pytest tmp_path pass the 107-byte limit and the simulation dies in round 1.
    scratch = Path(tempfile.mkdtemp(prefix="fr-"))
    env = {**os.environ, "PATH": path, "TMPDIR": str(scratch)}
    deadline = time.monotonic() + 300  # another run of Flower's local SuperLink may hold the port
    while not _port_free(LOCAL_PORT) and time.monotonic() < deadline:
        time.sleep(2)
    assert _port_free(LOCAL_PORT), f"port {LOCAL_PORT} is busy; the recipe needs it"
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["bash", "-e", "-c", script], cwd=app, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        left = _still_running(pid)
        shutil.rmtree(scratch, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert pid is not None and not left, "the recipe's `kill $SUPERLINK_PID` left the SuperLink running"
    deadline = time.monotonic() + 60  # its SuperExec and app processes follow their parent out
    while processes_naming([LOCAL_PORT]) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_naming([LOCAL_PORT]) == [], "a process of the recipe's SuperLink is still running"
    (run,) = (app / "runs").iterdir()
    assert (run / "checkpoints" / "round-0003.safetensors").exists(), (
        result.stdout[-4000:] + result.stderr[-2000:]
    )
    print(f"recipe ran in {time.monotonic() - started:.0f} s")
