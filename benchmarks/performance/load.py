"""Load: many clients over several rounds, with memory that stays flat from round to round.

Two workloads on Fashion-MNIST (60,000 training images, so even 10,000 clients hold 6 each:
5 to train on, 1 for local validation), the MLP, one local epoch:
  (a) 1,000 clients × 5 rounds, 10 % (100) trained per round;
  (b) 10,000 virtual clients × 5 rounds, 1 % (100) trained per round.
Federated evaluation asks 10 clients per round (the global model is also scored on the whole
test split every round). Each runs through `fedsim.run` (the simulation in its own process, Ray
workers below it) on `--cpus` cores.

A thread samples, every 0.2 s, the RSS of the simulation (server) process and the summed RSS
of its whole process tree (the server, Ray's GCS and raylet, the client workers). Samples are
cut into rounds at the moments the caller learns a round is complete (its checkpoint written),
so "round r" is the stretch from round r−1's checkpoint to round r's; round 0 is start-up and
the initial evaluation. Per round: wall time (the server's own, from metrics.csv) and the peak
of each RSS. The goal: memory flat, i.e. the last round's peak tree RSS within 10 % of the
second round's (the first round starts the Ray workers, so it is not the baseline), in both
workloads.

Usage: python -m benchmarks.performance.load [--quick] [--rounds R] [--cpus N];
writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig

# The last round's peak tree RSS may exceed the second round's by at most this share.
FLAT_MARGIN = 0.10
MB = 2**20


ROLES = ("server", "ray-services", "client-workers")


@dataclass
class Sample:
    at: float  # time.perf_counter()
    server: int  # RSS of the simulation process, bytes
    tree: int  # summed RSS of it and all its descendants, bytes
    rss: dict[str, int]  # RSS per role (see `role`), bytes
    cpu: dict[str, float]  # CPU seconds used so far per role, by the processes alive now


def role(proc: psutil.Process, server: psutil.Process) -> str:
    """The simulation process itself, a Ray client worker (`ray::` process title), or one of
    Ray's own services (GCS, raylet, log monitor, idle workers)."""
    if proc.pid == server.pid:
        return "server"
    return "client-workers" if proc.cmdline()[0].startswith("ray::") else "ray-services"


@dataclass
class TreeRss:
    """Samples the RSS of this process's child (the simulation) and of its whole tree."""

    interval: float = 0.2
    samples: list[Sample] = field(default_factory=list)
    max_processes: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                for child in me.children():
                    self._sample(child)
            self._stop.wait(self.interval)

    def _sample(self, server: psutil.Process) -> None:
        procs = [server, *server.children(recursive=True)]
        self.max_processes = max(self.max_processes, len(procs))
        rss = dict.fromkeys(ROLES, 0)
        cpu = dict.fromkeys(ROLES, 0.0)
        for proc in procs:
            with contextlib.suppress(psutil.Error, IndexError):  # a worker may exit meanwhile
                kind = role(proc, server)
                with proc.oneshot():
                    rss[kind] += proc.memory_info().rss
                    times = proc.cpu_times()
                cpu[kind] += times.user + times.system + times.children_user + times.children_system
        self.samples.append(Sample(time.perf_counter(), rss["server"], sum(rss.values()), rss, cpu))

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(config: RunConfig, runs_dir: Path, cpus: int) -> dict[str, object]:
    """Run `config` and return its per-round wall times and peak RSS (server, tree)."""
    completed: dict[int, float] = {}  # round -> when the caller saw its checkpoint
    start = time.perf_counter()
    with TreeRss() as rss:
        result = fedsim.run(
            config,
            runs_dir=runs_dir,
            cpus=cpus,
            on_round=lambda rnd, _: completed.setdefault(rnd, time.perf_counter()),
        )
    wall = time.perf_counter() - start
    server = result.server.set_index("round")
    rounds = []
    window_start = start
    cpu_before = dict.fromkeys(ROLES, 0.0)
    for rnd in sorted(completed):
        window = [s for s in rss.samples if window_start <= s.at <= completed[rnd]]
        window_start = completed[rnd]
        peak = max(window, key=lambda s: s.tree, default=None)
        cpu_at_end = window[-1].cpu if window else dict.fromkeys(ROLES, 0.0)
        rounds.append(
            {
                "round": rnd,
                "seconds": float(server.loc[rnd, "seconds"]),
                "peak_server_rss_mb": max((s.server for s in window), default=0) / MB,
                "peak_tree_rss_mb": max((s.tree for s in window), default=0) / MB,
                "peak_tree_rss_mb_by_role": {k: v / MB for k, v in (peak.rss if peak else {}).items()},
                "cpu_s_by_role": {k: max(0.0, cpu_at_end[k] - cpu_before[k]) for k in ROLES},
                "samples": len(window),
                "eval_accuracy": float(server.loc[rnd, "eval_accuracy"]),
            }
        )
        cpu_before = cpu_at_end
    trained = result.metrics[result.metrics["stage"] == "train"].groupby("round").size()
    evaluated = result.metrics[result.metrics["stage"] == "evaluate"].groupby("round").size()
    for row in rounds:
        row["clients_trained"] = int(trained.get(row["round"], 0))
        row["clients_evaluated"] = int(evaluated.get(row["round"], 0))
    baseline, last = rounds[2], rounds[-1]  # rounds[0] is start-up, rounds[1] starts the workers
    growth = last["peak_tree_rss_mb"] / baseline["peak_tree_rss_mb"] - 1
    return {
        "config": config.to_dict(),
        "cpus": cpus,
        "wall_s": wall,
        "rounds": rounds,
        "max_processes_in_tree": rss.max_processes,
        "tree_growth_last_vs_round2": growth,
        "server_growth_mb_last_vs_round2": last["peak_server_rss_mb"] - baseline["peak_server_rss_mb"],
        "flat": growth <= FLAT_MARGIN,
        "distinct_clients_trained": int(
            result.metrics.loc[result.metrics["stage"] == "train", "partition_id"].nunique()
        ),
    }


def print_table(label: str, entry: dict[str, object], load: tuple[float, float, float]) -> None:
    print(f"\n{label}: wall {entry['wall_s']:.1f} s on {entry['cpus']} cores, "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)")  # fmt: skip
    print(
        f"{'round':>5} {'seconds':>8} {'trained':>7} {'evaluated':>9} {'server MB':>9} {'tree MB':>8} "
        f"{'CPU s: server':>13} {'ray':>5} {'workers':>7} {'accuracy':>8}"
    )
    for row in entry["rounds"]:
        cpu = row["cpu_s_by_role"]
        print(
            f"{row['round']:>5} {row['seconds']:>8.2f} {row['clients_trained']:>7} "
            f"{row['clients_evaluated']:>9} {row['peak_server_rss_mb']:>9.0f} "
            f"{row['peak_tree_rss_mb']:>8.0f} {cpu['server']:>13.1f} "
            f"{cpu['ray-services']:>5.1f} {cpu['client-workers']:>7.1f} {row['eval_accuracy']:>8.3f}"
        )
    print(
        f"last round vs round 2: tree {entry['tree_growth_last_vs_round2']:+.1%}, "
        f"server {entry['server_growth_mb_last_vs_round2']:+.0f} MB -> "
        f"{'flat' if entry['flat'] else 'NOT flat'} (margin {FLAT_MARGIN:.0%})"
    )


def workloads(quick: bool, rounds: int) -> dict[str, RunConfig]:
    base = RunConfig(
        dataset="fashion-mnist", model="mlp", rounds=rounds, local_epochs=1, batch_size=32, seed=0
    )
    if quick:  # a development size: the same shape, smaller
        return {
            "300 clients, 10 % sampled": base.replace(
                name="load-300", num_clients=300, fraction_train=0.1, fraction_evaluate=10 / 300
            )
        }
    return {
        "1,000 clients, 10 % sampled": base.replace(
            name="load-1000", num_clients=1_000, fraction_train=0.1, fraction_evaluate=0.01
        ),
        "10,000 clients, 1 % sampled": base.replace(
            name="load-10000", num_clients=10_000, fraction_train=0.01, fraction_evaluate=0.001
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 300-client run instead")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per workload (default 5)")
    parser.add_argument("--cpus", type=int, default=2, help="cores for the simulation (default 2)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    args = parser.parse_args()
    began = time.perf_counter()
    results: dict[str, object] = {
        "goal": (
            f"every workload completes all rounds and the last round's peak process-tree RSS is "
            f"within {FLAT_MARGIN:.0%} of the second round's"
        ),
        "machine": {
            "cores": os.cpu_count(),
            "memory_gb": psutil.virtual_memory().total / 2**30,
            "python": platform.python_version(),
        },
        "workloads": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in workloads(args.quick, args.rounds).items():
            entry = measure(config, Path(tmp), args.cpus)
            entry["load_average"] = list(os.getloadavg())
            entry["completed"] = entry["rounds"][-1]["round"] == config.rounds
            results["workloads"][label] = entry
            print_table(label, entry, os.getloadavg())
    entries = results["workloads"].values()
    results["goal_met"] = all(e["flat"] and e["completed"] for e in entries)
    results["seconds"] = time.perf_counter() - began
    print(f"\ngoal met: {results['goal_met']} ({results['seconds']:.0f} s)")
    if not args.quick and args.rounds == 5:  # the settings only
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
