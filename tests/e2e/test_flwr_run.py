"""`flwr run .` drives the same ServerApp/ClientApp on Flower's managed local SuperLink."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.deployment import copy_app
from tests.support.runs import ROOT, final_server_accuracy

# One at a time under pytest-xdist: every managed local SuperLink listens on the same port.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flwr-superlink")]


def _superlink_pids(flwr_home: Path) -> list[int]:
    """The SuperLink `flwr run` started for this FLWR_HOME (its log file lives there)."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


CENTRAL_DP_CLIENT = "defence='clip' clipping-norm=5.0 central-dp='client' noise-multiplier=0.01"


@pytest.mark.parametrize(
    "overrides", [CENTRAL_DP_CLIENT, "secagg=true audit=true"], ids=["fedavg-central-dp", "secagg"]
)
def test_flwr_run_writes_a_run_directory(overrides: str, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    flwr_home, runs = tmp_path / "flwr-home", tmp_path / "runs"
    flwr_home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else it pulls GBs of CUDA torch
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        "flwr", "run", ".", "--stream",
        "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
        "-c", f"runs-dir='{runs}' rounds=2 clients=3 name='smoke' {overrides}",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, cwd=app, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for pid in _superlink_pids(flwr_home):
            os.kill(pid, signal.SIGTERM)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # SIGTERM stops it, within a minute even when another test holds the other core.
    deadline = time.monotonic() + 60
    while _superlink_pids(flwr_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    still_running = _superlink_pids(flwr_home)
    for pid in still_running:
        os.kill(pid, signal.SIGKILL)  # leave no process behind, then fail
    assert not still_running, "the managed SuperLink ignored SIGTERM for a minute"
    (run,) = runs.iterdir()
    assert run.name.startswith("smoke-")
    assert (run / "checkpoints" / "round-0002.safetensors").exists()
    assert final_server_accuracy(run) > 0.5
    if (
        overrides == CENTRAL_DP_CLIENT
    ):  # via `-c`: Flower's clipping mod on the clients, accountant on the server
        assert (run / "privacy.csv").read_text().count("central-dp(client)") == 2
    if "secagg=true" in overrides:  # SecAgg+ through the module-level apps: the sum is audited
        with open(run / "audit.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(r["round"], r["partition_id"]) for r in rows] == [("1", ""), ("2", "")]
        assert all(r["threat"].startswith("SecAgg+ aggregate of 3 clients (b=") for r in rows)


def test_every_knob_is_a_flwr_run_config_key() -> None:
    """Flower refuses `-c key=value` for keys missing from [tool.flwr.app.config]."""
    import tomllib

    from fedsim.config.run_config import RunConfig

    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overridden = {"name": "flwr", "clients": 2, "rounds": 2}
    expected = {knob.key: overridden.get(knob.key, knob.default) for knob in RunConfig.knobs()}
    assert app_config == {**expected, "runs-dir": "runs"}
