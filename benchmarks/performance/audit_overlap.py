"""The audit off the critical path: round time and wall time with the audit off, on in the round
(serial, `--audit-workers 0`) and on in worker processes (`--audit-workers N`), at FedSGD and at
one local epoch.

Round time is the server row's `seconds` (one evaluation to the next), averaged over the rounds
after the first (which also starts Ray's actors). Wall time is the whole `fedsim.run`, start-up
and the final wait for pending audits included: overlapping can hide the audit only where a core
is idle during the rounds; where the audit's work per round exceeds the round's, the bounded
queue fills and the rounds slow to the audit's pace (back-pressure), and the rest shows as a
longer wait at the end.

Usage: python -m benchmarks.performance.audit_overlap [--rounds N] [--workers N];
writes benchmarks/results/audit_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig

GOAL = 1.25  # round time with the audit on (workers) ÷ off


def workloads(rounds: int) -> dict[str, RunConfig]:
    return {
        # The Makefile demo's second command: FedSGD of CNN6 on photo crops, every client audited.
        "fedsgd-cnn6-photos": RunConfig(
            name="fedsgd", dataset="photos", model="cnn6", num_clients=3, rounds=rounds, batch_size=1,
            max_local_steps=1, learning_rate=0.1, momentum=0.0, fraction_evaluate=0.0,
            audit_attacks="layerwise", audit_clients=0, seed=0,
        ),
        # The demo's first command: one local epoch of FedAvg on digits, two clients audited.
        "1-epoch-mlp-digits": RunConfig(
            name="epoch", dataset="digits", model="mlp", num_clients=5, rounds=rounds,
            partitioner="dirichlet", alpha=1.0, local_epochs=1, batch_size=8, fraction_evaluate=0.0,
            audit_attacks="layerwise,analytic-fc,idlg", audit_clients=2, seed=0,
        ),
    }  # fmt: skip


def measure(config: RunConfig, runs_dir: Path) -> dict[str, object]:
    start = time.perf_counter()
    result = fedsim.run(config, runs_dir=runs_dir)
    wall = time.perf_counter() - start
    seconds = [float(s) for s in result.server["seconds"].iloc[1:]]  # rounds 1..R
    steady = seconds[1:] or seconds
    return {
        "wall_s": wall,
        "round_s": statistics.mean(steady),
        "round_s_each": seconds,
        "final_accuracy": float(result.server["eval_accuracy"].iloc[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="audit workers of the overlapped run")
    parser.add_argument("--only", default="", help="run one workload (its name)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "audit_overlap.json")
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "settings": {"rounds": args.rounds, "audit_workers": args.workers},
        "goal": f"round time with the audit on (workers) <= {GOAL}x off",
    }
    started = time.perf_counter()
    goal_met = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, base in workloads(args.rounds).items():
            if args.only and label != args.only:
                continue
            modes = {
                "off": base.replace(name=f"{base.name}-off"),
                "serial": base.replace(name=f"{base.name}-serial", audit=True, audit_workers=0),
                "workers": base.replace(name=f"{base.name}-workers", audit=True, audit_workers=args.workers),
            }
            entry: dict[str, object] = {"config": modes["workers"].to_dict()}
            for mode, config in modes.items():
                entry[mode] = measure(config, Path(tmp))
                print(
                    f"{label} audit {mode}: round {entry[mode]['round_s']:.2f} s, "
                    f"wall {entry[mode]['wall_s']:.1f} s",
                    flush=True,
                )
            off = entry["off"]
            for mode in ("serial", "workers"):
                entry[f"round_ratio_{mode}"] = entry[mode]["round_s"] / off["round_s"]
                entry[f"wall_ratio_{mode}"] = entry[mode]["wall_s"] / off["wall_s"]
            entry["goal_met"] = entry["round_ratio_workers"] <= GOAL
            goal_met = goal_met and entry["goal_met"]
            results[label] = entry
            print(
                f"{label}: round time on/off serial {entry['round_ratio_serial']:.2f}x, "
                f"workers {entry['round_ratio_workers']:.2f}x (goal <= {GOAL}x: "
                f"{'met' if entry['goal_met'] else 'not met'}); wall serial "
                f"{entry['wall_ratio_serial']:.2f}x, workers {entry['wall_ratio_workers']:.2f}x",
                flush=True,
            )
    results["seconds"] = time.perf_counter() - started
    if args.only and args.output.exists():  # one workload rerun: keep the others' measurements
        kept = json.loads(args.output.read_text())
        results = {**kept, **results, "seconds": kept.get("seconds", 0.0) + results["seconds"]}
        goal_met = all(v["goal_met"] for v in results.values() if isinstance(v, dict) and "goal_met" in v)
    results["goal_met"] = goal_met
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
