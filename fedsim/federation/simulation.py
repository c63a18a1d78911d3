"""Launch a federation on Flower's Ray simulation engine, on this machine or a Ray cluster."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedsim.data.clients import dataset_for
from fedsim.errors import RunFailedError, UserInputError
from fedsim.federation import dispatch
from fedsim.federation.client_app import build_client_app
from fedsim.federation.secagg_client import route_secagg
from fedsim.federation.server_app import build_server_app
from fedsim.plan.federation_plan import FederationPlan
from fedsim.strategy.validation import DIVERGED


def backend_config(cpus: int | None, cpus_per_client: int, ray_address: str | None) -> dict[str, Any]:
    """Ray settings: one actor per `cpus_per_client` cores; `ray_address` joins a running cluster."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a cluster address nobody answers at: Ray itself would wait for minutes.

    `auto` is resolved the way `ray.init` resolves it (RAY_ADDRESS, then the address the last
    `ray start` wrote to <ray temp dir>/ray_current_cluster, then a raylet running on this
    machine); `host:port` and `ray://host:port` are probed as given.
    """
    shown = address
    if address == "auto":
        address = local_ray_cluster()
        shown = f"auto ({address})"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserInputError(f"--ray-address {address!r} is not host:port; pass e.g. 10.0.0.5:6379 or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()  # [IPv6]
    except OSError as err:
        raise UserInputError(
            f"no Ray cluster answers at {shown} ({err.strerror or err}); "
            "start one with `ray start --head` or fix --ray-address"
        ) from None


def local_ray_cluster() -> str:
    """The address `ray.init(address="auto")` would join, found without connecting: Ray's own
    lookup (an environment variable, a file, a scan of this machine's processes), which takes
    milliseconds where a failed `ray.init` retries for minutes."""
    from ray._private.services import get_ray_address_from_environment  # Ray's start is slow

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found:
        raise UserInputError(
            "--ray-address auto found no Ray cluster on this machine (no RAY_ADDRESS, no running "
            "`ray start`); start one with `ray start --head`, pass host:port, or drop --ray-address"
        )
    return str(found)


def simulate(
    plan: FederationPlan,
    cpus: int | None = None,
    cpus_per_client: int = 1,
    ray_address: str | None = None,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> None:
    """Run the plan to its last round; raise if the ServerApp stopped early (Flower only logs it).

    The virtual nodes run `client_app`, by default fedsim's with training samples shared for the
    auditor: Flower cannot give simulated nodes a node config, and they hold the user's own data.
    """
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        # ERROR: also hides the deprecation notice of run_simulation, which we call knowingly
        # (`flwr run .` is the supported path for deployments; see docs/how-to/flwr-run.md).
        logging.getLogger("flwr").setLevel(logging.ERROR)
    # Load the data here, before Ray starts: loaded in the ServerApp's thread (Flower starts it
    # first), a BLAS-heavy preparation such as fortunes-lsa's SVD raced Ray's fork of its helper
    # processes and deadlocked the child. The thread then finds it in the per-process cache.
    dataset_for(plan.config)
    dispatch.install()  # Flower's own sweep costs O(nodes × messages) every 0.1 s
    reason = ""
    try:
        run_simulation(
            server_app=build_server_app(plan),
            client_app=client_app
            or build_client_app(share_truth=True, mods=[route_secagg] if plan.config.secagg else []),
            num_supernodes=plan.config.num_clients,
            backend_config=backend_config(cpus, cpus_per_client, ray_address),
            verbose_logging=verbose,
        )
    except RunFailedError as err:  # re-raised by run_simulation from the ServerApp's thread
        reason = f" ({err})"
    reached = plan.store.last_complete_round() or 0
    if reached < plan.last_round():
        # Resuming a diverged run would diverge again: its settings, not the run, need changing.
        advice = (
            "start a new run (another --name) with the lower setting"
            if DIVERGED in reason
            else f"rerun with --verbose to see Flower's log, then --resume {plan.store.path}"
        )
        raise RunFailedError(
            f"the simulation stopped after round {reached} of {plan.last_round()}{reason}; {advice}"
        )
