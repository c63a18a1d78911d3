"""Fault injection for reliability tests and benchmarks: clients that crash, hang, drop out or
send garbage, chosen per node.

A Flower mod (`fault_mod`) wraps fedsim's real ClientApp and, on train messages of the chosen
rounds, turns an honest client into a faulty one:

- `raise`: trains, then raises before replying (a crash mid-train: the work is lost);
- `timeout`: trains, then sleeps past the round's `round-timeout` before replying (a hung node);
- `dropout`: sleeps past the round's timeout without training (a node gone for the round);
- `nan`, `inf`: one weight of the reply is NaN / +Inf;
- `shape`: the first array loses its last row;
- `dtype`: every array is sent as float64;
- `scale`: the update Δw = local − global is sent 10⁶× too large.

Which node misbehaves when: a deployed SuperNode's node config key `fault` (e.g.
`--node-config "partition-id=3 num-partitions=6 fault=nan@2"`); in simulation, where Flower sets
node configs itself, a spec the test passes, `"3=nan@1,3=shape@2,4=dropout@2"` (partition=kind,
`@round` limits it to one round; without it the fault fires every round).

Run as a driver, one federation per process (as Flower needs): `python -m fedsim.federation.fault_injection
RUNS_ROOT --faults SPEC --config JSON [--cpus N]` writes the run `RUNS_ROOT/<name>` and exits 0
when the federation completes, 1 when it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsim import wire

KINDS = ("raise", "timeout", "dropout", "nan", "inf", "shape", "dtype", "scale")
SCALE = 1e6
HANG_MARGIN = 5.0  # seconds a hung client sleeps beyond the round's timeout
FAULT_KEY = "fault"  # the node-config key of a deployed node
EVERY_ROUND = 0

FaultPlan = dict[int, dict[int, str]]  # partition id → round (0: every round) → kind


def parse_spec(spec: str) -> FaultPlan:
    """`"3=nan@1,4=raise"` → {3: {1: "nan"}, 4: {0: "raise"}}; ValueError on anything else."""
    plan: FaultPlan = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        partition, _, fault = item.partition("=")
        kind, server_round = _kind_and_round(fault)
        plan.setdefault(int(partition), {})[server_round] = kind
    return plan


def _kind_and_round(fault: str) -> tuple[str, int]:
    kind, _, server_round = fault.strip().partition("@")
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r}; choose from {', '.join(KINDS)}")
    return kind, int(server_round) if server_round else EVERY_ROUND


def fault_for(plan: FaultPlan, node_config: Mapping[str, object], server_round: int) -> str | None:
    """This node's fault in this round: its own node config first, else the test's plan."""
    if FAULT_KEY in node_config:
        kind, only = _kind_and_round(str(node_config[FAULT_KEY]))
        return kind if only in (EVERY_ROUND, server_round) else None
    faults = plan.get(int(node_config.get(wire.PARTITION_ID, -1)), {})
    return faults.get(server_round, faults.get(EVERY_ROUND))


def fault_mod(plan: FaultPlan) -> Mod:
    """A Flower mod injecting `plan`'s faults into train replies (see the module docstring)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        instructions = wire.read_instructions(msg.content)
        kind = fault_for(plan, context.node_config, instructions.server_round)
        hang = instructions.config.round_timeout + HANG_MARGIN
        if kind == "dropout":
            time.sleep(hang)
        reply = call_next(msg, context)
        if kind == "raise":
            raise RuntimeError("injected fault: the client crashed mid-train")
        if kind == "timeout":
            time.sleep(hang)
        if kind in ("nan", "inf", "shape", "dtype", "scale"):
            sent = {name: array.numpy() for name, array in msg.content[wire.ARRAYS].items()}
            returned = {name: array.numpy() for name, array in reply.content[wire.ARRAYS].items()}
            reply.content[wire.ARRAYS] = ArrayRecord(
                {name: Array(np.ascontiguousarray(a)) for name, a in corrupt(kind, returned, sent).items()}
            )
        return reply

    return mod


def corrupt(kind: str, weights: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reply's arrays as the faulty client sends them (`sent`: the round's global model)."""
    out = {name: value.copy() for name, value in weights.items()}
    first = next(name for name, value in out.items() if np.issubdtype(value.dtype, np.floating))
    if kind in ("nan", "inf"):
        out[first].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        out[first] = out[first][:-1]
    elif kind == "dtype":
        out = {name: value.astype(np.float64) for name, value in out.items()}
    elif kind == "scale":
        out = {
            name: (sent[name] + SCALE * (value - sent[name])).astype(value.dtype)
            for name, value in out.items()
        }
    else:
        raise ValueError(f"{kind!r} does not change the arrays")
    return out


# The demonstration both the slow test and benchmarks/performance/faults.py run: clients 0-2 honest, 3-5
# misbehaving differently each round, every kind once (scale twice). Round 2's two silent
# clients cost one round-timeout wait; a third actor keeps the honest clients going meanwhile.
DEMO_FAULTS = "3=nan@1,4=inf@1,5=scale@1,3=shape@2,4=dropout@2,5=timeout@2,3=raise@3,4=dtype@3,5=scale@3"
# round-timeout counts from a round's first reply: 60 s covers the honest spread on a loaded machine.
DEMO_CONFIG = {"name": "faulty", "clients": 6, "rounds": 3, "round-timeout": 60, "audit": True,
               "audit-clients": 0}  # fmt: skip
DEMO_CPUS = 3
REPO = Path(__file__).resolve().parents[2]


def injected(plan: FaultPlan, rounds: int) -> int:
    """How many faulty replies `plan` injects in a run of `rounds` rounds."""
    return sum(rounds if r == EVERY_ROUND else int(r <= rounds) for faults in plan.values() for r in faults)


def run_driver(
    runs_root: Path,
    faults: str = DEMO_FAULTS,
    config: Mapping[str, object] | None = None,
    timeout: float = 1200,
) -> subprocess.CompletedProcess[str]:
    """This module as a driver in its own process (one simulation per process)."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fedsim.federation.fault_injection", str(runs_root), "--faults", faults,
         "--config", json.dumps(dict(config or DEMO_CONFIG)), "--cpus", str(DEMO_CPUS)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": python_path}, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from fedsim.config.run_config import RunConfig
    from fedsim.errors import RunFailedError
    from fedsim.federation.client_app import build_client_app
    from fedsim.federation.simulation import simulate
    from fedsim.plan.federation_plan import FederationPlan
    from fedsim.plan.planning import validate_plan
    from fedsim.store.run_store import RunStore
    from fedsim.training.local import metric_names

    parser = argparse.ArgumentParser(prog="python -m fedsim.federation.fault_injection")
    parser.add_argument("runs_root", type=Path)
    parser.add_argument("--faults", required=True)
    parser.add_argument("--config", required=True, help="run config keys as a JSON object")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args(argv)
    config = RunConfig.from_mapping(json.loads(args.config))
    validate_plan(config)
    plan = FederationPlan(config, RunStore.create(args.runs_root, config, metric_names(config)))
    app = build_client_app(share_truth=True, mods=[fault_mod(parse_spec(args.faults))])
    try:
        simulate(plan, cpus=args.cpus, client_app=app)
    except RunFailedError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
