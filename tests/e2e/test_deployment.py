"""The same ServerApp/ClientApp on real `flower-superlink` + `flower-supernode` processes on
127.0.0.1: plaintext, and TLS with SuperNode authentication. Every process is started by the test
on ports it picked, and stopped by PID with its descendants."""

from __future__ import annotations

import csv
import ssl
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from audits.scoring.engine import NO_TRUTH_NOTE
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from tests.support.deployment import (
    Processes,
    copy_app,
    flower_env,
    free_ports,
    make_node_key,
    make_tls_files,
    processes_naming,
    wait_until,
)

# Every port is picked free by the test, so these may run beside tests/e2e/test_flwr_run.py.
pytestmark = pytest.mark.slow

# As short as a federation gets: 2 rounds, 2 nodes, one batch-1 step each (so the layer-wise
# attack runs), no federated evaluation (each message costs a fresh ClientApp process).
RUN_CONFIG = (
    "name='deploy' rounds=2 clients=2 model='mlp' dataset='digits' audit=true "
    "batch-size=1 max-local-steps=1 fraction-evaluate=0"
)
RUN_TIMEOUT = 900  # seconds for `flwr run`; 2 cores shared with other work make processes slow
OWN_LABEL = 7
# flwr's SUPERNODE_CONNECTION_ERROR: logged as "Exit Code: 305", the process exits with status 1.
SUPERNODE_EXIT = "Exit Code: 305"


def _superlink_ready(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2, verify=verify).is_success
    except httpx.HTTPError:
        return False


def _flwr_run(app: Path, federation: str, runs: Path, env: dict[str, str]) -> None:
    command = ["flwr", "run", ".", federation, "--stream", "-c", f"runs-dir='{runs}' {RUN_CONFIG}"]
    result = subprocess.run(command, cwd=app, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _assert_rounds_and_audit(runs: Path) -> list[dict[str, str]]:
    """Both nodes trained their own partition in both rounds; every update was audited, and
    leakage is recorded as not measurable: deployed nodes did not opt in to share samples."""
    (run,) = runs.iterdir()
    assert (run / "checkpoints" / "round-0002.safetensors").exists()
    with open(run / "metrics.csv", newline="") as handle:
        trained = {(r["round"], r["partition_id"]) for r in csv.DictReader(handle) if r["stage"] == "train"}
    assert trained == {("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")}
    with open(run / "audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["round"], r["partition_id"]) for r in rows) == [
        ("1", "0"),
        ("1", "1"),
        ("2", "0"),
        ("2", "1"),
    ]
    assert all(r["attack"] == "layerwise" and r["psnr"] == "" and r["sample"] == "" for r in rows)
    assert all(NO_TRUTH_NOTE in r["note"] for r in rows), [r["note"] for r in rows]
    return rows


def _supernode(
    port: int, runtime_port: int, partition_id: int, *security: str, data: str = "num-partitions=2"
) -> list[str]:
    return [
        "flower-supernode", *security,
        "--superlink", f"127.0.0.1:{port}",
        "--port", str(runtime_port),  # each SuperNode's own Runtime API port
        "--node-config", f"partition-id={partition_id} {data}",
    ]  # fmt: skip


def _node_file(path: Path, partition_id: int, label: int) -> Path:
    """A node's own samples as a deployed node would hold them: that partition's images of one
    digit, so the audit's recovered labels show the node trained on this file, not on a slice."""
    data = client_data(RunConfig(num_clients=2), partition_id)
    x, y = torch.cat([data.x_train, data.x_val]).numpy(), torch.cat([data.y_train, data.y_val]).numpy()
    np.savez(path, x=x[y == label], y=y[y == label])
    return path


def _stop_and_check(processes: Processes, ports: list[int]) -> None:
    stubborn = processes.stop()
    assert processes.running() == [], "processes left running"
    assert processes_naming(ports) == [], "a Flower process naming this test's ports still runs"
    assert stubborn == [], f"ignored SIGTERM for a minute: {stubborn}"


def test_superlink_and_two_supernodes_run_the_app(tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    env = flower_env(tmp_path / "flwr-home")
    link, node0, node1 = ports = free_ports(3)
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink.deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    processes = Processes(tmp_path / "logs", env, ports)
    try:
        processes.start(
            "superlink",
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(link)],
        )  # fmt: skip
        wait_until(lambda: _superlink_ready(f"http://127.0.0.1:{link}"), 120, "the SuperLink")
        processes.start("supernode-0", _supernode(link, node0, 0, "--insecure"))
        # Node 1 trains on its own file (node config data-path), not on a slice of the dataset.
        own = _node_file(tmp_path / "node-1.npz", 1, OWN_LABEL)
        processes.start("supernode-1", _supernode(link, node1, 1, "--insecure", data=f'data-path="{own}"'))
        _flwr_run(app, "deployment", tmp_path / "runs", env)
    finally:
        _stop_and_check(processes, ports)
    rows = _assert_rounds_and_audit(tmp_path / "runs")
    # iDLG's label rule reads the label off a batch-1 update: node 1 trained on its file of 7s.
    assert [r["recovered_labels"] for r in rows if r["partition_id"] == "1"] == [str(OWN_LABEL)] * 2


def test_tls_superlink_refuses_unregistered_and_plaintext_nodes(tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    env = flower_env(tmp_path / "flwr-home")
    certs = tmp_path / "certs"
    ca, cert, key = make_tls_files(certs)
    keys = [make_node_key(certs, name) for name in ("node-0", "node-1", "stranger")]
    link, node0, node1, stranger, plain = ports = free_ports(5)
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink.tls-deployment]\naddress = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n'
    )
    tls = ssl.create_default_context(cafile=str(ca))
    processes = Processes(tmp_path / "logs", env, ports)
    try:
        processes.start(
            "superlink",
            ["flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
             "--ssl-keyfile", str(key), "--enable-supernode-auth",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link)],
        )  # fmt: skip
        wait_until(lambda: _superlink_ready(f"https://127.0.0.1:{link}", tls), 120, "the TLS SuperLink")
        # Plaintext HTTP cannot talk to it at all.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{link}/health", timeout=10)
        for _, public in keys[:2]:  # register two nodes through the Control API; not the stranger
            registered = subprocess.run(
                ["flwr", "supernode", "register", str(public), "tls-deployment"],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert registered.returncode == 0, registered.stdout + registered.stderr
        secure = ("--root-certificates", str(ca), "--max-retries", "2", "--max-wait-time", "60")
        strangers = {
            "unregistered": processes.start(
                "unregistered",
                _supernode(link, stranger, 0, *secure, "--auth-supernode-private-key", str(keys[2][0])),
            ),
            "plaintext": processes.start(
                "plaintext",
                _supernode(link, plain, 1, "--insecure", "--max-retries", "2", "--max-wait-time", "60"),
            ),
        }
        for name, process in strangers.items():  # both give up: the SuperLink never accepts them
            process.wait(timeout=240)
            assert process.returncode == 1, (name, process.returncode, processes.log(name))
            assert SUPERNODE_EXIT in processes.log(name), processes.log(name)
            assert "Failed to initialize the connection to the SuperLink" in processes.log(name)
        processes.start(
            "supernode-0",
            _supernode(link, node0, 0, *secure[:2], "--auth-supernode-private-key", str(keys[0][0])),
        )
        processes.start(
            "supernode-1",
            _supernode(link, node1, 1, *secure[:2], "--auth-supernode-private-key", str(keys[1][0])),
        )
        _flwr_run(app, "tls-deployment", tmp_path / "runs", env)
    finally:
        _stop_and_check(processes, ports)
    _assert_rounds_and_audit(tmp_path / "runs")
