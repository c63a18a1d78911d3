"""`--ray-address auto` joins a running Ray cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.ray_cluster import closed_port


@pytest.mark.slow
def test_ray_address_auto_joins_a_running_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` still finds a cluster that `ray start --head` started (its own temp folder, a free
    port); its processes are stopped by PID afterwards, never with `ray stop` (which stops every
    Ray cluster of this machine)."""
    import psutil

    from fedsim.federation.simulation import check_ray_address, local_ray_cluster

    root = Path(tempfile.mkdtemp(prefix="fsr", dir="/tmp"))  # Ray's socket paths must stay short
    port = closed_port()
    env = {**os.environ, "RAY_TMPDIR": str(root)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = Path(sys.executable).parent / "ray"
    command = [
        str(ray_bin),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=1",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=True)
        monkeypatch.setenv("RAY_TMPDIR", str(root))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        found = local_ray_cluster()
        assert found.endswith(f":{port}"), found  # the head that `ray start` wrote to the file
        check_ray_address("auto")
    finally:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(str(root) in part for part in process.info["cmdline"] or ()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        shutil.rmtree(root, ignore_errors=True)
