"""DAM fidelity: single-stage pruning in a federation, and whether pruning changes leakage.

Bu et al. (NeurIPS 2021) claim DAM prunes during training, so the zero-gated units can be
deleted afterwards with no fine-tuning. At small scale, on Fashion-MNIST: `dam-mlp`
(784-256-256-10) and `dam-cnn` (two stride-2 3×3 convs of 16 and 32 channels, a 128-unit hidden
layer) trained by FedAvg with the penalty λ and, as the reference, the same network with λ = 0;
goal: at least 50 % of the hidden units removed with at most 1 point of accuracy lost.
The pruned network is rebuilt by `models.dam.compact` (units physically removed, gates folded
into the next layer), and its test accuracy is measured on the rebuilt network itself.

Leakage: the security metric (layer-wise score, end-to-end deficit, PSNR ceiling) and the best
measured attack PSNR (`audits.architecture.standalone.audit_model`, batch-1 gradients of the same test
samples) for the reference network, the trained DAM network as clients train it (masked), and
its compact rebuild.

Usage: python -m benchmarks.fidelity.dam [--quick] [--only dam-mlp|dam-cnn]; writes
benchmarks/results/fidelity_dam.json (`--only` keeps the other workload's entry) and prints a
Markdown table per workload.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedsim
from audits.architecture.standalone import audit_model
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig
from fedsim.data.registry import load_dataset
from fedsim.store.audit_folder import load_weights
from fedsim.training.local import evaluate
from fedsim.training.run_model import build_run_model
from models import ZooModel
from models.dam import DamNetwork, compact

RESULT = ROOT / "benchmarks" / "results" / "fidelity_dam.json"
ATTACKS = "layerwise,inverting-gradients"
TRAIN = {
    "dataset": "fashion-mnist", "clients": 4, "rounds": 12, "local_epochs": 1, "max_local_steps": 50,
    "batch_size": 128, "learning_rate": 0.05, "momentum": 0.9, "fraction_evaluate": 0.0, "seed": 0,
}  # fmt: skip
QUICK_TRAIN = {**TRAIN, "rounds": 3, "max_local_steps": 20}
# Per workload: the full run and the `--quick` smoke run (λ larger so a short run prunes at all).
WORKLOADS: dict[str, dict[str, dict[str, Any]]] = {
    "dam-mlp": {
        # 24 rounds at λ 0.06: at 12 rounds λ 0.06/0.08/0.1 removed 38/49/58 % for 0.38/0.96/1.23
        # points; at 24 rounds λ 0.05 removed 48 % for 0.42 points.
        "full": {
            "train": {**TRAIN, "model": "dam-mlp", "rounds": 24},
            "lam": 0.06,
            "cold_rounds": 1,
            "audit_samples": 3,
        },
        "quick": {
            "train": {**QUICK_TRAIN, "model": "dam-mlp"},
            "lam": 0.5,
            "cold_rounds": 1,
            "audit_samples": 1,
        },
    },
    "dam-cnn": {
        # At 12 rounds λ 0.1 removed 44.3 % for 1.17 points; at 24 rounds λ 0.08, 46.0 % for 0.64.
        "full": {
            "train": {**TRAIN, "model": "dam-cnn", "rounds": 24},
            "lam": 0.1,
            "cold_rounds": 1,
            "audit_samples": 2,
        },
        "quick": {
            "train": {**QUICK_TRAIN, "model": "dam-cnn"},
            "lam": 0.5,
            "cold_rounds": 1,
            "audit_samples": 1,
        },
    },
}


def train(settings: dict[str, Any], lam: float, name: str, runs: Path) -> tuple[DamNetwork, fedsim.RunResult]:
    """One federation; the final global model loaded back from its last checkpoint."""
    options = f"lam={lam},cold_rounds={settings['cold_rounds']}"
    config = RunConfig.from_mapping({**settings["train"], "model_options": options, "name": name})
    result = fedsim.run(config, runs_dir=runs)
    data = load_dataset(config.dataset)
    model = build_run_model(config.model, data.spec, options)
    load_weights(model, result.checkpoints[-1])
    assert isinstance(model, DamNetwork)
    return model, result


def accuracy(model: ZooModel, dataset: str) -> float:
    data = load_dataset(dataset)
    return evaluate(model, torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)).metrics["accuracy"]


def hidden_units(model: ZooModel) -> list[int]:
    """Units per hidden layer: a DAM network's units with g > 0, else the output units (channels
    of a conv) of every weighted layer but the head."""
    if isinstance(model, DamNetwork):
        return model.widths()
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features for m in weighted[:-1]]


def leakage(model: ZooModel, dataset: str, samples: int) -> dict[str, Any]:
    """The security metric and the best attack's mean PSNR on `samples` seeded test samples."""
    data = load_dataset(dataset)
    chosen = np.random.default_rng(0).choice(len(data.y_test), size=samples, replace=False)
    model.eval()
    start = time.perf_counter()
    audit = audit_model(
        model, data.x_test[chosen], data.y_test[chosen], ATTACKS.split(","), sample_ids=chosen
    )
    report = audit.architecture
    outcomes = {o.attack: o.mean_psnr for o in report.attacks if o.mean_psnr is not None}
    best = max(outcomes, key=lambda name: outcomes[name]) if outcomes else None
    layerwise = report.layerwise
    e2e = report.identifiability
    return {
        "security_score": None if layerwise is None else int(layerwise.score),
        "layer_deficits": None if layerwise is None else [int(r.deficit) for r in layerwise.layers],
        "e2e_deficit": None if e2e is None else int(e2e.deficit),
        "psnr_ceiling": None if report.bound is None else round(float(report.bound.psnr_ceiling), 2),
        "attack_psnr": {name: round(float(value), 2) for name, value in outcomes.items()},
        "best_attack": best,
        "best_attack_psnr": None if best is None else round(float(outcomes[best]), 2),
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | hidden units | removed | test accuracy | security score | e2e deficit | "
        "PSNR ceiling (dB) | best attack PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        leak = row["leakage"]
        lines.append(
            f"| {row['network']} | {'-'.join(map(str, row['hidden_units']))} "
            f"| {row['removed_percent']:.1f} % | "
            f"{100 * row['accuracy']:.2f} % | {leak['security_score']} | {leak['e2e_deficit']} | "
            f"{leak['psnr_ceiling']} | {leak['best_attack_psnr']} ({leak['best_attack']}) |"
        )
    return "\n".join(lines)


def measure(settings: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Train the reference and the DAM network, rebuild the compact one, score all three."""
    dataset = settings["train"]["dataset"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fidelity-dam-") as tmp:
        reference, _ = train(settings, 0.0, "reference", Path(tmp))
        pruned, run = train(settings, settings["lam"], "dam", Path(tmp))
    widths_per_round = [
        [int(row[f"eval_width_{i + 1}"]) for i in range(len(pruned.gates()))]
        for _, row in run.server.iterrows()
    ]
    small = compact(pruned)
    dense_units = sum(m.units for m in pruned.gates())
    rows = []
    for label, model in (
        ("reference (λ = 0)", reference),
        (f"DAM λ = {settings['lam']}, masked", pruned),
        ("DAM compact rebuild", small),
    ):
        units = hidden_units(model)
        rows.append(
            {
                "network": label,
                "hidden_units": units,
                "removed_percent": 100 * (1 - sum(units) / dense_units),
                "accuracy": round(accuracy(model, dataset), 4),
                "leakage": leakage(model, dataset, settings["audit_samples"]),
            }
        )
    data = load_dataset(dataset)
    x = torch.as_tensor(data.x_test[:512])
    with torch.no_grad():
        max_output_gap = float((pruned(x) - small(x)).abs().max())
    removed = rows[2]["removed_percent"]
    loss_points = 100 * (rows[0]["accuracy"] - rows[2]["accuracy"])
    return {
        "claim": "≥ 50 % of hidden units removed with ≤ 1 point accuracy loss, no fine-tuning",
        "settings": settings,
        "rows": rows,
        "widths_per_round": widths_per_round,
        "removed_percent": round(removed, 1),
        "accuracy_loss_points": round(loss_points, 2),
        "goal_met": bool(removed >= 50 and loss_points <= 1.0),
        "compact_max_output_gap": max_output_gap,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "quick": quick,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (fewer rounds and samples)")
    parser.add_argument("--only", choices=sorted(WORKLOADS), help="run one workload (others kept in --out)")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the JSON")
    args = parser.parse_args()
    names = [args.only] if args.only else list(WORKLOADS)
    previous = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    results = dict(previous.get("workloads", {}))
    for name in names:
        result = measure(WORKLOADS[name]["quick" if args.quick else "full"], args.quick)
        results[name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"workloads": results}, indent=2, ensure_ascii=False) + "\n")
        print(f"### {name}\n" + table(result["rows"]))
        print(
            f"\nremoved {result['removed_percent']:.1f} % of hidden units, accuracy loss "
            f"{result['accuracy_loss_points']:.2f} points (goal met: {result['goal_met']}); compact vs "
            f"masked max |Δoutput| {result['compact_max_output_gap']:.2e}; "
            f"{result['seconds']:.0f} s -> {args.out}"
        )


if __name__ == "__main__":
    main()
