"""Fault tolerance: a federation with crashing, hanging, silent and garbage-sending clients.

Runs the fault-injection harness's demonstration (`fedsim/federation/fault_injection.py`: 6 digits-MLP
clients, 3 rounds, clients 3-5 faulty in every round: NaN, Inf, 10⁶× update, wrong shape,
drop-out, time-out, crash, wrong dtype, 10⁶× again) in its own process, then reads the run
folder: faults injected, faults logged in faults.csv, rounds completed and lost, whether every
checkpoint is finite, final accuracy, and whether the auditor saw a faulty update.

Goal: 0 rounds lost, every injected fault logged with a reason, no non-finite checkpoint, and
no audit row for a faulty update.

Usage: python -m benchmarks.performance.faults; writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from benchmarks.paths import ROOT
from fedsim.federation.fault_injection import (
    DEMO_CONFIG,
    DEMO_CPUS,
    DEMO_FAULTS,
    injected,
    parse_spec,
    run_driver,
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args()
    rounds = int(DEMO_CONFIG["rounds"])
    plan = parse_spec(DEMO_FAULTS)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_driver(Path(tmp))
        seconds = time.perf_counter() - started
        run = Path(tmp) / str(DEMO_CONFIG["name"])
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
        server = [r for r in read_csv(run / "metrics.csv") if r["stage"] == "server"]
        completed = max(int(r["round"]) for r in server)
        faults = read_csv(run / "faults.csv")
        faulty = {(int(r), pid) for pid, faults_of in plan.items() for r in faults_of}
        logged = {(int(f["round"]), int(f["partition_id"])) for f in faults if f["partition_id"]}
        audited = {(int(r["round"]), int(r["partition_id"])) for r in read_csv(run / "audit.csv")}
        finite = all(
            bool(t.isfinite().all())
            for checkpoint in (run / "checkpoints").glob("round-????.safetensors")
            for t in load_file(checkpoint).values()
        )
        kinds: dict[str, int] = {}
        for row in faults:
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
        numbers = {
            "faults_injected": injected(plan, rounds),
            "faults_logged": len(faults),
            "faults_logged_by_kind": kinds,
            "injected_faults_unlogged": sorted(faulty - logged),
            "rounds_planned": rounds,
            "rounds_completed": completed,
            "rounds_lost": rounds - completed,
            "checkpoints_finite": finite,
            "audit_rows_of_faulty_updates": len(audited & faulty),
            "final_accuracy": float(server[-1]["eval_accuracy"]),
            "round_seconds": [round(float(r["seconds"]), 1) for r in server],
            "exit_code": result.returncode,
        }
    goal_met = (
        numbers["rounds_lost"] == 0
        and not numbers["injected_faults_unlogged"]
        and finite
        and numbers["audit_rows_of_faulty_updates"] == 0
        and result.returncode == 0
    )
    report = {
        "settings": {"config": DEMO_CONFIG, "faults": DEMO_FAULTS, "cpus": DEMO_CPUS},
        **numbers,
        "goal": "0 rounds lost; every injected fault in faults.csv; finite checkpoints; "
        "no audit of a faulty update",
        "goal_met": goal_met,
        "seconds": round(seconds, 1),
    }
    print(f"{'faults injected':<28}{numbers['faults_injected']}")
    print(f"{'faults logged':<28}{numbers['faults_logged']} {kinds}")
    print(f"{'rounds completed / planned':<28}{completed} / {rounds}")
    print(f"{'rounds lost':<28}{numbers['rounds_lost']}")
    print(f"{'checkpoints finite':<28}{finite}")
    print(f"{'audit rows of faulty':<28}{numbers['audit_rows_of_faulty_updates']}")
    print(f"{'final accuracy':<28}{numbers['final_accuracy']:.4f}")
    print(f"{'wall seconds':<28}{seconds:.1f}  (goal met: {goal_met})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
