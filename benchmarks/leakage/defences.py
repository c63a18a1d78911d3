"""What each defence buys and costs: accuracy, privacy budget, the best attack's PSNR, wall time.

For two workloads (the MLP on `digits`, CNN6 on 32×32 `photos`) and each defence at two
strengths, all in this one run, side by side with no defence:

- a *training* federation (FedAvg, several local steps) gives the final server test accuracy,
  the ε spent (central DP: client-level, Flower's RdpAccountant; DP-SGD: the largest
  cumulative sample-level ε of any client, Opacus's RDP accountant with Poisson sampling) and
  the wall time relative to the undefended run;
- an *attack* federation (FedSGD: batch 1, one step, lr 0.1, no momentum, every update
  audited, 1 round) gives the best attack's mean PSNR/SSIM on what the server received. This
  is the worst case for the clients; DP-SGD runs here with shuffled batches, so the attacker
  faces exactly one clipped, noised per-sample gradient.

Usage: python -m benchmarks.leakage.defences [--quick] [--only mlp-digits|cnn6-photos];
writes benchmarks/results/defences.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError

WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp-digits": {
        "base": {"dataset": "digits", "model": "mlp"},
        "train": {"clients": 5, "rounds": 5, "local_epochs": 1, "batch_size": 16},
        "attacks": "analytic-fc,idlg",
    },
    "cnn6-photos": {
        "base": {"dataset": "photos", "model": "cnn6", "image_size": 32},
        # R-GAP's bias-free CNN6 learns slowly: lr 0.01 with momentum reaches ≈ 0.77 after 10 epochs
        # on one client; 6 rounds × 2 local epochs of 4 clients is about that much training.
        "train": {"clients": 4, "rounds": 6, "local_epochs": 2, "batch_size": 16, "learning_rate": 0.01},
        "attacks": "layerwise,idlg",
    },
}
ATTACK_RUN = {
    "clients": 3, "rounds": 1, "batch_size": 1, "max_local_steps": 1, "learning_rate": 0.1, "momentum": 0.0,
    "fraction_evaluate": 0.0, "audit": True, "audit_clients": 0,
}  # fmt: skip
# (label, config changes) per defence, weaker strength first; `--quick` keeps the first of each.
DEFENCES: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = [
    ("dp-sgd", [("z=0.5,C=1", {"defence": "dp-sgd", "noise_multiplier": 0.5}),
                ("z=1.1,C=1", {"defence": "dp-sgd", "noise_multiplier": 1.1})]),
    ("clip", [("C=1", {"defence": "clip", "clipping_norm": 1.0}),
              ("C=0.1", {"defence": "clip", "clipping_norm": 0.1})]),
    ("topk", [("keep 0.1", {"defence": "topk", "keep": 0.1}),
              ("keep 0.01", {"defence": "topk", "keep": 0.01})]),
    ("gaussian", [("std 1e-3", {"defence": "gaussian", "noise_std": 1e-3}),
                  ("std 1e-2", {"defence": "gaussian", "noise_std": 1e-2})]),
    ("central-dp server", [("z=0.1,C=1", {"central_dp": "server", "noise_multiplier": 0.1}),
                           ("z=0.5,C=1", {"central_dp": "server", "noise_multiplier": 0.5})]),
    ("central-dp client", [("z=0.1,C=1", {"central_dp": "client", "noise_multiplier": 0.1}),
                           ("z=0.5,C=1", {"central_dp": "client", "noise_multiplier": 0.5})]),
    ("secagg", [("3 shares", {"secagg": True, "secagg_shares": 3, "secagg_threshold": 2})]),
]  # fmt: skip


def timed_run(config: RunConfig, runs_dir: Path) -> tuple[fedsim.RunResult | str, float]:
    """The run's result, or why it failed (a defence can make training diverge: that is a result)."""
    start = time.perf_counter()
    try:
        result: fedsim.RunResult | str = fedsim.run(config, runs_dir=runs_dir)
    except RunFailedError as err:
        result = str(err)
    return result, time.perf_counter() - start


def last_server_value(result: fedsim.RunResult, column: str) -> float | None:
    values = result.server[column].dropna() if column in result.server else pd.Series(dtype=float)
    return float(values.iloc[-1]) if len(values) else None


def best_attack(audit: pd.DataFrame | None) -> dict[str, Any]:
    """The attack with the highest mean PSNR over the audited updates, and its SSIM."""
    if audit is None or audit["psnr"].dropna().empty:
        return {"attack": None, "psnr": None, "ssim": None}
    means = audit.dropna(subset=["psnr"]).groupby("attack")[["psnr", "ssim"]].mean()
    name = str(means["psnr"].idxmax())
    return {"attack": name, "psnr": round(float(means.loc[name, "psnr"]), 2),
            "ssim": round(float(means.loc[name, "ssim"]), 3)}  # fmt: skip


def _first_text(audit: pd.DataFrame | None, column: str) -> str:
    """A column's first cell as text (pandas reads an all-empty column as NaN floats)."""
    value = audit[column].iloc[0] if audit is not None and len(audit) else ""
    return value if isinstance(value, str) else ""


def measure(name: str, label: str, changes: dict[str, Any], workload: dict[str, Any], runs: Path) -> dict:
    base = {**workload["base"], **changes, "seed": 0}
    train_config = RunConfig.from_mapping({**base, **workload["train"], "name": f"{name}-train"})
    attack_changes = {"poisson_sampling": False} if changes.get("defence") == "dp-sgd" else {}
    attack_config = RunConfig.from_mapping(
        {
            **base,
            **ATTACK_RUN,
            **attack_changes,
            "audit_attacks": workload["attacks"],
            "name": f"{name}-attack",
        }
    )
    trained, seconds = timed_run(train_config, runs)
    attacked, _ = timed_run(attack_config, runs)
    if isinstance(trained, str) or isinstance(attacked, str):
        return {
            "defence": label,
            "failed": trained if isinstance(trained, str) else attacked,
            "train_seconds": round(seconds, 1),
            "accuracy": None,
            "epsilon": None,
            "best_attack": {"attack": None, "psnr": None, "ssim": None},
        }
    epsilon = last_server_value(trained, "epsilon_central") or last_server_value(
        trained, "epsilon_client_max"
    )
    return {
        "defence": label,
        "accuracy": round(float(trained.server["eval_accuracy"].iloc[-1]), 4),
        "epsilon": None if epsilon is None or not math.isfinite(epsilon) else round(epsilon, 3),
        "delta": train_config.target_delta if epsilon is not None else None,
        "train_seconds": round(seconds, 1),
        "best_attack": best_attack(attacked.audit),
        "attack_threat": _first_text(attacked.audit, "threat"),
        "defences_seen_by_attacker": _first_text(attacked.audit, "defences"),
    }


def markdown_table(workload: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"\n{workload}\n",
        "| defence | accuracy | ε (δ=1e-5) | best attack | PSNR | SSIM | training run | vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        best = row["best_attack"]
        cells = [
            row["defence"],
            "diverged (exit 1)" if row.get("failed") else f"{row['accuracy']:.3f}",
            row["epsilon"],
            best["attack"],
            best["psnr"],
            best["ssim"],
        ]
        shown = ["–" if cell is None else str(cell) for cell in cells]
        ratio = f"{row['wall_vs_none']}×" if row.get("wall_vs_none") is not None else "–"
        lines.append(f"| {' | '.join(shown)} | {row['train_seconds']} s | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one strength per defence")
    parser.add_argument("--only", choices=sorted(WORKLOADS), help="one workload")
    parser.add_argument(
        "--defences",
        help="comma-separated defence names (e.g. 'central-dp server,secagg'; 'none': the baseline only) to "
        "rerun with a fresh baseline, replacing those rows of --only's workload in the results file",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "defences.json")
    args = parser.parse_args()
    # `--only` updates its workload in an existing results file and keeps the other's.
    results: dict[str, Any] = (
        json.loads(args.output.read_text()) if args.only and args.output.exists() else {}
    )
    results["machine"] = {"cores": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for workload_name, workload in WORKLOADS.items():
            if args.only and workload_name != args.only:
                continue
            # A throwaway first run: the first one of a process pays for cold caches (imports,
            # the dataset's construction), which would inflate the baseline.
            measure(f"{workload_name}-warm-up", "warm-up", {}, workload, runs)
            rows = [measure(f"{workload_name}-none", "none", {}, workload, runs)]
            print(json.dumps(rows[-1]), flush=True)
            chosen = {name.strip() for name in args.defences.split(",")} if args.defences else None
            for defence, strengths in DEFENCES:
                if chosen is not None and defence not in chosen:
                    continue
                for index, (strength, changes) in enumerate(strengths[:1] if args.quick else strengths):
                    label = f"{defence} {strength}"
                    rows.append(
                        measure(
                            f"{workload_name}-{defence.replace(' ', '-')}-{index}",
                            label,
                            changes,
                            workload,
                            runs,
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
            baseline = rows[0]["train_seconds"]
            for row in rows:
                row["wall_vs_none"] = round(row["train_seconds"] / baseline, 2)
            if chosen is not None:  # replace the rerun rows (and the baseline); ratios against it
                fresh = {row["defence"] for row in rows}
                kept = [r for r in results.get(workload_name, []) if r["defence"] not in fresh]
                rows = [rows[0], *kept, *rows[1:]]
                for row in rows:
                    row["wall_vs_none"] = round(row["train_seconds"] / baseline, 2)
            results[workload_name] = rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for workload_name in WORKLOADS:
        if workload_name in results:
            print(markdown_table(workload_name, results[workload_name]))


if __name__ == "__main__":
    main()
