"""docker/compose.yml's own commands, run as native processes (no Docker daemon here or on CI).

Every service's command is taken from compose.yml and run unchanged but for three remaps a host
without Docker needs: /app/certs -> make-certs.sh's output, compose host names -> localhost (in every
certificate's SANs), and container ports -> free local ports. So the TLS flags, SuperNode
authentication, process isolation with one SuperExec per SuperNode, and the node configs are
exercised end to end by a real `flwr run` — what is not exercised is the images themselves.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from tests.support.runs import ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
APP_FILES = ("pyproject.toml", "README.md", "fedsim", "models", "attacks", "audits")
ENTRYPOINT = {
    "superlink": "flower-superlink",
    "supernode": "flower-supernode",
    "superexec": "flower-superexec",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listens on port {port} after {timeout:.0f} s")


class Deployment:
    """compose.yml's services as local processes; each in its own session, stopped by its PID."""

    def __init__(self, services: dict[str, dict[str, Any]], tmp: Path) -> None:
        self.services, self.tmp = services, tmp
        self.certs = tmp / "certs"
        self.addresses: dict[str, str] = {}  # "host:port" in compose -> "localhost:<free port>"
        self.ports: dict[str, int] = {}  # service -> the free port it serves on
        for name, service in services.items():
            port = next((a.split("=", 1)[1] for a in service["command"] if a.startswith("--port=")), None)
            if port is not None:
                self.ports[name] = free_port()
                self.addresses[f"{name}:{port}"] = f"localhost:{self.ports[name]}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_files: list[IO[bytes]] = []
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
        }

    def command(self, name: str, service: dict[str, Any], role: str) -> list[str]:
        out = []
        for arg in service["command"]:
            arg = arg.replace("/app/certs/", f"{self.certs}/").replace("/app/state/", f"{self.tmp}/")
            for compose_address, local in self.addresses.items():
                arg = arg.replace(compose_address, local)
            if arg.startswith("--port="):
                arg = f"--port={self.ports[name]}"
            out.append("--host=127.0.0.1" if arg == "--host=0.0.0.0" else arg)
        return [str(BIN / ENTRYPOINT[role]), *out]

    def start(
        self, name: str, service: dict[str, Any] | None = None, role: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start compose service `name` (or `service` under that name, an image of kind `role`)."""
        home = self.tmp / "home" / name
        home.mkdir(parents=True)
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.log_files.append(log)
        proc = subprocess.Popen(
            self.command(name, service or self.services[name], role or name.split("-")[0]),
            env={**self.env, "FLWR_HOME": str(home)},
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "FLWR_HOME": str(self.tmp / "cli-home")}
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in self.log_files:
            log.close()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen"
)
def test_compose_commands_run_a_tls_authenticated_federation(tmp_path: Path) -> None:
    services = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())["services"]
    nodes = sorted(name for name in services if name.startswith("supernode-"))
    made = subprocess.run(
        ["bash", str(ROOT / "docker" / "make-certs.sh"), "--nodes", str(len(nodes) + 1),
         "--out", str(tmp_path / "certs")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    deployment = Deployment(services, tmp_path)
    (tmp_path / "cli-home").mkdir()
    (tmp_path / "cli-home" / "config.toml").write_text(
        f'[superlink.docker]\naddress = "127.0.0.1:{deployment.ports["superlink"]}"\n'
        f'root-certificates = "{deployment.certs / "ca.crt"}"\n'
    )
    app, runs = tmp_path / "app", tmp_path / "runs"
    app.mkdir()
    for name in APP_FILES:  # a copy: `flwr run` packs the folder and may rewrite pyproject.toml
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, app / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, app / name)
    try:
        deployment.start("superlink")
        deployment.start("superexec-serverapp")
        wait_for_port(deployment.ports["superlink"], timeout=120)
        for node in nodes:
            key = str(deployment.certs / f"{node}-auth.pub")
            done = deployment.flwr("supernode", "register", key, "docker", cwd=tmp_path, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        for node in nodes:
            deployment.start(node)
            deployment.start(node.replace("supernode", "superexec-clientapp"))
        # A SuperNode whose key was never registered is refused (it exits; registered ones keep running).
        stranger = {**services[nodes[-1]]}
        stranger["command"] = [
            f"--auth-supernode-private-key=/app/certs/supernode-{len(nodes) + 1}-auth"
            if a.startswith("--auth-supernode-private-key=") else a
            for a in stranger["command"]
        ]  # fmt: skip
        deployment.ports["stranger"] = free_port()
        refused = deployment.start("stranger", stranger, role="supernode")

        done = deployment.flwr(
            "run", ".", "docker", "--stream",
            "-c", f"runs-dir='{runs}' rounds=1 clients={len(nodes)} name='compose'",
            cwd=app, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + deployment.logs()
        # Flower logs its exit code 305 (SUPERNODE_CONNECTION_ERROR); the process exits with status 1.
        assert refused.wait(timeout=120) == 1, "an unregistered SuperNode was not refused"
        assert "Exit Code: 305" in (tmp_path / "stranger.log").read_text()
        for node in nodes:
            assert deployment.procs[node].poll() is None, f"{node} died:\n{deployment.logs()}"
    finally:
        deployment.stop()

    (run_dir,) = runs.glob("compose-*")
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["stage"] == "train"]
    assert sorted(int(r["partition_id"]) for r in rows) == list(range(len(nodes))), rows
