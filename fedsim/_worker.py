"""One federation in its own process: `python -m fedsim._worker RUN_DIR --report FILE ...`.

`fedsim.run` launches this because Flower's `run_simulation` is not safe to call twice in one
process (its ServerApp thread can outlive the call). The run directory already holds a
validated config; the caller follows its metrics.csv for progress. This process tells how it
ended in a small JSON report (`kind`: input, run or crash, and a one-line `message`) and exits
0 (done), 1 (the run failed) or 2 (bad input found only now, e.g. a damaged run folder).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from fedsim.errors import RunFailedError, UserInputError

# fedsim's own warnings (rejected updates, failed clients) start with this in the child's log,
# so the caller can show them even when it hides Flower's and Ray's logs.
WARNING_PREFIX = "warning: "

_PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _die_with_parent(args.parent)
    _reap_group_when_gone()
    _show_fedsim_warnings()
    from fedsim.federation.simulation import simulate
    from fedsim.plan.federation_plan import FederationPlan
    from fedsim.store.run_store import RunStore

    try:
        store = RunStore.open(args.run_dir)
        plan = FederationPlan(store.config, store, stop_after=args.stop_after)
        simulate(plan, cpus=args.cpus, ray_address=args.ray_address, verbose=args.verbose)
    except UserInputError as err:
        _report(args.report, "input", str(err))
        return UserInputError.exit_code
    except RunFailedError as err:
        _report(args.report, "run", str(err))
        return 1
    except Exception as err:  # a bug: keep the traceback for the caller
        details = traceback.format_exc()
        print(details, file=sys.stderr)
        _report(args.report, "crash", f"{type(err).__name__}: {err}".splitlines()[0], details)
        return 1
    return 0


def _show_fedsim_warnings() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WARNING_PREFIX + "%(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("fedsim")
    logger.addHandler(handler)
    logger.propagate = False


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedsim._worker", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--cpus", type=int)
    parser.add_argument("--ray-address")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def _report(path: Path, kind: str, message: str, details: str = "") -> None:
    path.write_text(json.dumps({"kind": kind, "message": message, "details": details}))


def _die_with_parent(parent: int) -> None:
    """A caller killed mid-round (SIGKILL, a closed notebook) must not leave this federation
    writing the run folder behind its back: die with it, as a single process would."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _reap_group_when_gone() -> None:
    """Ray's helpers (raylet, GCS, dashboard and runtime-env agents, actors) inherit this
    process's group, which `fedsim.api` makes a group of its own. Ray's agents outlive a driver
    killed with SIGKILL by a minute or more; a watchdog in the group, started before Ray, kills
    the whole group the moment this process is gone, however it ended."""
    if os.name != "posix" or os.getpgrp() != os.getpid():
        return  # not the leader of its own group (run by hand): never kill a caller's group
    subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


# Polls its parent, as PR_SET_PDEATHSIG would deliver a signal it cannot act on before dying.
_WATCHDOG = """
import os, signal, sys, time
worker = int(sys.argv[1])
while os.getppid() == worker:
    time.sleep(0.5)
os.killpg(worker, signal.SIGKILL)
"""


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _exit(code: int) -> None:
    """Exit now, whatever threads are left: after a failed start (Ray's node start timing out
    under load) a non-daemon thread of Flower or Ray kept the interpreter from exiting, and the
    caller waited on a finished worker forever. Everything this process writes is written and
    closed before `main` returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
