"""Simulation overhead: fedsim (Flower + Ray) against the same training as a plain loop.

Part 1 runs one workload twice in this run, side by side: once with `fedsim.run` (the
simulation in its own process, so Ray starts from cold, as for a user) and once as a plain
PyTorch loop in one process doing the same client training, FedAvg and server evaluation. It
reports wall times, their ratio, the ideal (loop time ÷ cores), the simulation's start-up (wall
time before round 1 starts, from the run's own per-round times) and peak RSS of each process
tree.

Part 2 measures scale: 1,000 and 10,000 virtual clients with 10–100 sampled per round.

Usage: python -m benchmarks.performance.sim_overhead [--quick]; writes benchmarks/results/sim_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data, dataset_for
from fedsim.training.local import evaluate, model_for, train_locally


class PeakRss:
    """Samples the summed RSS of a process's descendants (the simulation process and Ray's
    workers), optionally with the process itself."""

    def __init__(self, pid: int, interval: float = 0.2, include_root: bool = True) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.include_root = include_root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [*([self.root] if self.include_root else []), *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):  # a worker may exit between list and read
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_fedsim(config: RunConfig, runs_dir: Path) -> dict[str, float]:
    """`fedsim.run` (the simulation in its own process, so Ray starts from cold, as for a user);
    wall time, start-up, rounds and the peak RSS of the simulation's process tree."""
    start = time.perf_counter()
    with PeakRss(os.getpid(), include_root=False) as rss:
        result = fedsim.run(config, runs_dir=runs_dir)
    wall = time.perf_counter() - start
    server = result.server
    round_seconds = [float(s) for s in server["seconds"].iloc[1:]]
    return {
        "wall_s": wall,
        "rounds_s": sum(round_seconds[1:]),  # rounds after the first: steady state
        "first_round_s": round_seconds[0],  # includes starting the Ray actors
        "startup_s": wall - sum(round_seconds),
        "final_accuracy": float(server["eval_accuracy"].iloc[-1]),
        "peak_rss_mb": rss.peak / 2**20,
    }


def plain_loop(config: RunConfig) -> dict[str, float]:
    """The same training in one process: each sampled client in turn, FedAvg, server evaluation."""
    start = time.perf_counter()
    data = dataset_for(config)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    global_model = model_for(config, data)
    clients = [client_data(config, pid) for pid in range(config.num_clients)]
    setup = time.perf_counter() - start
    round_times = []
    for server_round in range(1, config.rounds + 1):
        round_start = time.perf_counter()
        states, weights = [], []
        for pid, local in enumerate(clients):
            model = copy.deepcopy(global_model)
            result = train_locally(model, local, config, server_round, pid)
            states.append(model.state_dict())
            weights.append(result.num_examples)
        total = sum(weights)
        global_model.load_state_dict(
            {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}
        )
        accuracy = evaluate(global_model, x_test, y_test).metrics["accuracy"]
        round_times.append(time.perf_counter() - round_start)
    return {
        "wall_s": time.perf_counter() - start,
        "setup_s": setup,
        "rounds_s": sum(round_times[1:]),
        "final_accuracy": accuracy,
        "peak_rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


def side_by_side(config: RunConfig, runs_dir: Path, cores: int) -> dict[str, object]:
    loop = plain_loop(config)
    sim = run_fedsim(config, runs_dir)
    return {
        "config": config.to_dict(),
        "plain_loop": loop,
        "fedsim": sim,
        "ratio_wall": sim["wall_s"] / loop["wall_s"],
        "ratio_steady_rounds": sim["rounds_s"] / loop["rounds_s"],
        "ideal_ratio": 1 / cores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 10,000-client run")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sim_overhead.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)  # the loop gets one core, as each simulated client does
    base = RunConfig(num_clients=10, local_epochs=1, rounds=3, fraction_evaluate=0.0, seed=0)
    workloads = {
        # The workload: tiny, so start-up dominates; reported for completeness.
        "digits-mlp (issue workload)": base.replace(name="digits-mlp"),
        # The same shape of training, heavy enough that the loop takes >= 10 s.
        "digits32-cnn6 (compute-bound)": base.replace(
            name="digits32-cnn6", model="cnn6", image_size=32, learning_rate=0.02, local_epochs=10
        ),
    }
    results: dict[str, object] = {"machine": {"cores": cores, "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for label, config in workloads.items():
            results[label] = entry = side_by_side(config, runs, cores)
            loop, sim = entry["plain_loop"], entry["fedsim"]
            print(
                f"{label}: loop {loop['wall_s']:.1f} s, fedsim {sim['wall_s']:.1f} s "
                f"(start-up {sim['startup_s']:.1f} s, first round {sim['first_round_s']:.1f} s) "
                f"-> wall ratio {entry['ratio_wall']:.2f}x, "
                f"steady rounds {entry['ratio_steady_rounds']:.2f}x "
                f"(ideal {entry['ideal_ratio']:.2f}x); peak RSS {sim['peak_rss_mb']:.0f} MB"
            )
        scale = [(1_000, 10), (1_000, 100)] + ([] if args.quick else [(10_000, 10), (10_000, 100)])
        results["scale"] = []
        for clients, sampled in scale:
            config = base.replace(
                name=f"scale-{clients}-{sampled}",
                dataset="fashion-mnist",
                num_clients=clients,
                fraction_train=sampled / clients,
                rounds=2,
            )
            sim = run_fedsim(config, runs)
            results["scale"].append({"clients": clients, "sampled_per_round": sampled, **sim})
            print(
                f"{clients} clients, {sampled} per round: wall {sim['wall_s']:.1f} s "
                f"(start-up {sim['startup_s']:.1f} s), peak RSS {sim['peak_rss_mb']:.0f} MB"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
