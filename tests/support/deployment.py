"""Helpers for tests that run fedsim on real Flower processes: a copy of the app, free ports,
a throwaway CA, SuperNode auth keys, and a process set that is stopped by PID (with every
descendant: SuperExec, ServerApp and ClientApp processes)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.runs import ROOT

APP_FILES = ("pyproject.toml", "README.md", "fedsim", "models", "attacks", "audits")
VENV_BIN = Path(sys.executable).parent


def copy_app(dest: Path) -> Path:
    """A copy of the app: `flwr run` packs the folder and may rewrite pyproject.toml."""
    dest.mkdir(parents=True)
    for name in APP_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, dest / name)
    return dest


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for flwr and Flower's processes: a private FLWR_HOME, no dependency install
    (else it pulls GBs of CUDA torch), the venv's bin first on PATH."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def free_ports(count: int) -> list[int]:
    """Ports the OS has free now (bound together, so distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


class Processes:
    """Processes a test started, each logging to its own file; `stop()` ends them and their
    descendants by PID and returns any that survived."""

    def __init__(self, logs: Path, env: dict[str, str], ports: Sequence[int]) -> None:
        self.logs = logs
        self.env = env
        self.ports = list(ports)  # the test's own ports: what its processes' command lines name
        self.started: dict[str, subprocess.Popen] = {}
        self.pids: set[int] = set()
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: Sequence[str], cwd: Path | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd
            )
        self.started[name] = process
        self.pids.add(process.pid)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def _tree(self) -> list[psutil.Process]:
        """Every started process and its descendants, and any process naming one of this test's
        ports: a SuperNode that exited (refused) leaves its SuperExec orphaned, out of the tree."""
        found: dict[int, psutil.Process] = {}
        for pid in processes_naming(self.ports):
            with contextlib.suppress(psutil.NoSuchProcess):
                found[pid] = psutil.Process(pid)
        for process in self.started.values():
            try:
                root = psutil.Process(process.pid)
                for member in [root, *root.children(recursive=True)]:
                    found[member.pid] = member
            except psutil.NoSuchProcess:
                continue
        self.pids.update(found)
        return list(found.values())

    def stop(self, timeout: float = 60.0) -> list[str]:
        """SIGTERM to every started process and descendant, SIGKILL to any still there after
        `timeout`; returns the ones that needed SIGKILL."""
        tree = self._tree()
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        stubborn = []
        for member in alive:
            try:
                stubborn.append(f"{member.pid} {member.name()}")
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for process in self.started.values():
            process.wait(timeout=10)  # reap, so no zombie is left either
        return stubborn

    def running(self) -> list[int]:
        """PIDs of everything this set ever saw that still runs (not a zombie)."""
        alive = []
        for pid in sorted(self.pids):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return alive


def processes_naming(ports: Sequence[int]) -> list[int]:
    """PIDs of any process whose command line names one of these (test-chosen, free) ports: a
    SuperExec, ServerApp or ClientApp that escaped the process tree would show here."""
    alternatives = "|".join(str(port) for port in ports)
    marks = re.compile(rf"127\.0\.0\.1:({alternatives})(?!\d)")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if ports and any(marks.search(arg) for arg in cmdline):
            found.append(process.info["pid"])
    return found


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a SuperLink certificate for 127.0.0.1 signed by it:
    (ca.crt, server.pem, server.key)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, server_key)
    return ca_path, cert_path, key_path


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair, ECDSA P-384 in OpenSSH format (as
    `ssh-keygen -t ecdsa -b 384` writes it): (private key, public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n"
    )
    private.chmod(0o600)
    return private, public
