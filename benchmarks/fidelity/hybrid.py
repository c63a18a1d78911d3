"""Fidelity of the hybrid SC/PSC network (Wang et al., CVPR 2021): does it beat plain CE on
long-tailed data, overall and on the tail classes?

Fashion-MNIST made globally long-tailed by the `longtail` partitioner (class c keeps
n_max·ρ^(−c/(C−1)) of its samples, ρ = 50 by default, then an IID split among the clients), the
balanced 10k test set untouched. Three federations with the same backbone, rounds, clients, local
steps, batch size and learning rate:

- `ce`: plain cross-entropy on one augmented view of the instance-balanced batch
  (`hybrid-sc` with `ce_only=true`: the same network, the projection head unused);
- `hybrid-sc` and `hybrid-psc`: α·L_SC/PSC + (1 − α)·L_CE(class-balanced batch), α = 1 − (T/T_max)².

Each federation runs in this process: every client trains with fedsim's own client loop
(`fedsim.training.local.train_locally`, seeded per client and round) and the server averages
the weights by examples (FedAvg), as `fedsim run` does, without Flower and Ray, whose start-up
(15 s idle, minutes on a loaded machine) would dominate; `--flower` runs each through `fedsim.run`
instead. The final global model of each is scored on the test set per class; tail = the 3
classes the partition left smallest. A `leakage` section audits the trained default model
(`hybrid-sc`). The hybrid's step sees three inputs per sample drawn (two views, one
class-balanced CE sample), so at equal steps it costs about 3× the compute of CE; the table
reports wall time.

Usage: python -m benchmarks.fidelity.hybrid [--quick] [--seeds N] [--rho 50] [--flower];
writes benchmarks/results/fidelity_hybrid.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data, dataset_for
from fedsim.data.partition import partition
from fedsim.data.registry import load_dataset
from fedsim.store.audit_folder import load_weights
from fedsim.training.local import model_for, train_locally
from fedsim.training.run_model import build_run_model

RESULTS = ROOT / "benchmarks" / "results" / "fidelity_hybrid.json"
TAIL_CLASSES = 3
# (label, model, model options): the CE baseline is the same network trained by plain CE.
METHODS = [
    ("ce", "hybrid-sc", "ce_only=true"),
    ("hybrid-sc", "hybrid-sc", ""),
    ("hybrid-psc", "hybrid-psc", ""),
]
FULL = {"clients": 4, "rounds": 8, "max_local_steps": 25, "batch_size": 64, "learning_rate": 0.05}
QUICK = {"clients": 2, "rounds": 2, "max_local_steps": 5, "batch_size": 32, "learning_rate": 0.05}


def run_config(
    label: str, model: str, options: str, settings: dict[str, Any], rho: float, seed: int
) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "name": f"{label}-seed{seed}",
            "dataset": "fashion-mnist",
            "partitioner": "longtail",
            "imbalance_ratio": rho,
            "model": model,
            "model_options": options,
            "local_epochs": 1,
            "momentum": 0.9,
            "fraction_evaluate": 0.0,
            "seed": seed,
            **settings,
        }
    )


def per_class_accuracy(config: RunConfig, weights: Path) -> np.ndarray:
    """The final global model's accuracy on each class of the (balanced) test set."""
    data = load_dataset(config.dataset)
    model = build_run_model(config.model, data.spec, config.model_options)
    load_weights(model, weights)
    model.eval()
    x, y = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 1000]).argmax(dim=1) for i in range(0, len(y), 1000)])
    return np.array([float((predicted[y == c] == c).double().mean()) for c in range(data.spec.num_classes)])


def class_counts(config: RunConfig) -> np.ndarray:
    """Training samples per class after the long-tailed subsampling (all clients together)."""
    labels = load_dataset(config.dataset).y_train
    kept = np.concatenate(partition(labels, config.partition_spec()))
    return np.bincount(labels[kept], minlength=int(labels.max()) + 1)


def federate(config: RunConfig) -> dict[str, torch.Tensor]:
    """FedAvg over all clients each round, in this process, with fedsim's client loop; returns the
    final global weights."""
    data = dataset_for(config)
    model = model_for(config, data)
    clients = [client_data(config, pid) for pid in range(config.num_clients)]
    for server_round in range(1, config.rounds + 1):
        states, examples = [], []
        for pid, local in enumerate(clients):
            result = train_locally(copy.deepcopy(model), local, config, server_round, pid)
            states.append(result.weights)
            examples.append(result.num_examples)
        total = sum(examples)
        model.load_state_dict(
            {k: sum(s[k] * (n / total) for s, n in zip(states, examples, strict=True)) for k in states[0]}
        )
    return model.state_dict()


def measure(label: str, config: RunConfig, runs: Path, tail: list[int], flower: bool) -> tuple[dict, Path]:
    start = time.perf_counter()
    if flower:
        weights = fedsim.run(config, runs_dir=runs).checkpoints[-1]
    else:
        weights = runs / f"{config.name}.safetensors"
        save_file(federate(config), weights)
    seconds = time.perf_counter() - start
    accuracy = per_class_accuracy(config, weights)
    row = {
        "method": label,
        "seed": config.seed,
        "accuracy": round(float(accuracy.mean()), 4),
        "tail_accuracy": round(float(accuracy[tail].mean()), 4),
        "per_class": [round(float(a), 4) for a in accuracy],
        "wall_s": round(seconds, 1),
    }
    print(f"{label} seed {config.seed}: accuracy {row['accuracy']:.3f}, tail {row['tail_accuracy']:.3f}, "
          f"{seconds:.0f} s", flush=True)  # fmt: skip
    return row, weights


def leakage(weights: Path, samples: int) -> dict[str, Any]:
    """The trained default model's audit: security score, end-to-end deficit, PSNR ceiling and the
    best measured attack (Inverting Gradients; layer-wise declines a branched network)."""
    result = fedsim.audit(
        model="hybrid-sc",
        dataset="fashion-mnist",
        samples=samples,
        attacks="layerwise,inverting-gradients",
        weights=weights,
    )
    report = result.architecture
    summary = result.summary.set_index("attack")
    psnrs = summary["max_psnr"].dropna()
    return {
        "model": "hybrid-sc (trained, final round)",
        "samples": samples,
        "security_score": report.score,
        "security_note": report.layerwise_note or None,
        "end_to_end_deficit": report.end_to_end_deficit,
        "psnr_ceiling": None if report.psnr_ceiling is None else round(float(report.psnr_ceiling), 1),
        "best_attack": None if psnrs.empty else str(psnrs.idxmax()),
        "best_attack_psnr": None if psnrs.empty else round(float(psnrs.max()), 2),
        "attack_notes": {str(k): str(v) for k, v in summary["note"].items() if v},
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, _, _ in METHODS:
        mine = [r for r in rows if r["method"] == label]
        out[label] = {
            "accuracy": round(float(np.mean([r["accuracy"] for r in mine])), 4),
            "tail_accuracy": round(float(np.mean([r["tail_accuracy"] for r in mine])), 4),
            "wall_s": round(float(np.mean([r["wall_s"] for r in mine])), 1),
        }
    return out


def markdown(summary: dict[str, dict[str, float]], seeds: int) -> str:
    lines = [
        f"| method | test accuracy ({seeds} seed{'s' if seeds > 1 else ''}) | tail-class accuracy | wall s |",
        "|---|---|---|---|",
    ]
    for label, values in summary.items():
        lines.append(
            f"| {label} | {values['accuracy']:.3f} | {values['tail_accuracy']:.3f} | {values['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 clients, 2 rounds, 5 steps")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (default 1)")
    parser.add_argument("--rho", type=float, default=50.0, help="imbalance ratio ρ (default 50)")
    parser.add_argument("--audit-samples", type=int, default=1, help="samples the leakage audit attacks")
    parser.add_argument("--flower", action="store_true", help="run each federation through fedsim.run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spinning on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    counts = class_counts(run_config("ce", "hybrid-sc", "", settings, args.rho, 0))
    tail = sorted(int(c) for c in np.argsort(counts, kind="stable")[:TAIL_CLASSES])
    rows: list[dict[str, Any]] = []
    default_weights: Path | None = None
    with tempfile.TemporaryDirectory(prefix="fidelity-hybrid-") as tmp:
        for seed in range(args.seeds):
            for label, model, options in METHODS:
                config = run_config(label, model, options, settings, args.rho, seed)
                row, weights = measure(label, config, Path(tmp), tail, args.flower)
                rows.append(row)
                if label == "hybrid-sc" and seed == 0:
                    default_weights = weights
        assert default_weights is not None
        leak = leakage(default_weights, 1 if args.quick else args.audit_samples)
    summary = summarise(rows)
    ce = summary["ce"]
    claim = {
        label: {
            "beats_ce_overall": summary[label]["accuracy"] > ce["accuracy"],
            "beats_ce_on_tail": summary[label]["tail_accuracy"] > ce["tail_accuracy"],
        }
        for label in ("hybrid-sc", "hybrid-psc")
    }
    payload = {
        "claim": "hybrid SC/PSC beats plain CE on long-tailed Fashion-MNIST (rho 50), overall and tail",
        "quick": args.quick,
        "settings": {**settings, "rho": args.rho, "seeds": args.seeds, "local_epochs": 1, "momentum": 0.9},
        "federation": "fedsim.run (Flower simulation)"
        if args.flower
        else "in-process FedAvg, fedsim client loop",
        "train_class_counts": counts.tolist(),
        "tail_classes": tail,
        "rows": rows,
        "summary": summary,
        "met": claim,
        "leakage": leak,
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown(summary, args.seeds))
    print(f"tail classes {tail} (train counts {counts.tolist()}); claim met: {claim}")
    print(f"leakage: {leak}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
