"""ProtoPNet fidelity: "about as accurate as its black-box backbone" (Chen et al. 2019), small scale.

The paper builds ProtoPNet on an ImageNet-pretrained backbone and compares it with that backbone
fine-tuned as a plain classifier. The analogue here, on Fashion-MNIST (28x28):

1. pretraining ("ImageNet"): the registered `protopnet`'s backbone (three blocks Conv3x3-ReLU-
   Pool of 32, 64, 64 channels) with a linear head, on a pretraining split disjoint from the task
   split;
2. black box: the pretrained backbone + a fresh linear head, trained on the task split;
3. ProtoPNet: the pretrained backbone + add-on + the paper's 10 prototypes per class (the
   registered defaults) and two last-layer rounds, trained on the same task split for the same
   number of epochs (one epoch = one round of its stage clock: warm, joint, push, last layer)
   with the same optimiser (Adam, lr 3e-3) and batches. Its push runs through the federated code
   path with one client (`after_local_training` → `extra_records` → the server's
   `after_aggregation`).

Goal: ProtoPNet's test accuracy within 2 points of the black box's. Also measured: what the push
reveals (each pushed prototype's latent patch inverted back to its receptive-field window,
PSNR), the audit's leakage numbers for the trained ProtoPNet (`fedsim.api.audit`), and the
prototype picture (patch + similarity map + 95th-percentile box).

Usage: python -m benchmarks.fidelity.protopnet [--quick] [--seeds 0,1,2] [--no-audit]; writes
benchmarks/results/fidelity_protopnet.json (and _prototypes.png beside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from attacks.disclosure.latent_patch import invert_latent_patch
from benchmarks.paths import ROOT
from fedsim.data.registry import load_dataset
from models import TrainingSettings, build_model
from models.protopnet import ProtoPNet, push_candidates
from models.protopnet_figure import save_prototype_figure

RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = RESULTS / "fidelity_protopnet.json"
FIGURE = RESULTS / "fidelity_protopnet_prototypes.png"
LR = 3e-3
BATCH = 32
GOAL_POINTS = 2.0
PROTOPNET_OPTIONS = {"last_layer_rounds": 2}
CLASS_NAMES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {
            "pretrain": 2000,
            "task": 1000,
            "test": 1000,
            "pretrain_epochs": 1,
            "epochs": 4,
            "audit_samples": 1,
        }
    return {
        "pretrain": 10000,
        "task": 5000,
        "test": 5000,
        "pretrain_epochs": 2,
        "epochs": 12,
        "audit_samples": 1,
    }


def _batches(count: int, epoch: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return list(order.split(BATCH))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(y), 500)
    )
    return correct / len(y)


def _train_plain(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, x_test=None, y_test=None
) -> list[float]:
    """Adam on CE; the test accuracy after each epoch when a test split is given."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    accuracies = []
    for epoch in range(epochs):
        model.train()
        for batch in _batches(len(y), epoch, seed):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        if x_test is not None:
            accuracies.append(_accuracy(model, x_test, y_test))
    return accuracies


class _Loader:
    """What `after_local_training` iterates: (inputs, labels, indices) batches of the client's data."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        for start in range(0, len(self.y), 256):
            stop = start + 256
            yield self.x[start:stop], self.y[start:stop], torch.arange(start, min(stop, len(self.y)))


def _train_protopnet(
    model: ProtoPNet, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, x_test, y_test
) -> dict[str, Any]:
    """One client, `epochs` rounds of the stage clock, the push through the server hook."""
    settings = TrainingSettings(learning_rate=LR, rounds=epochs, batch_size=BATCH)
    log = []
    for server_round in range(1, epochs + 1):
        previous = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
        optimizer = model.configure_optimizer(settings, server_round)
        model.train()
        for batch in _batches(len(y), server_round - 1, seed):
            optimizer.zero_grad()
            loss = model.training_loss(model, x[batch], y[batch])
            loss.backward()
            optimizer.step()
        model.after_local_training(_Loader(x, y), server_round)  # type: ignore[arg-type]
        records = [model.extra_records()]
        aggregated = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
        before_push = _accuracy(model, x_test, y_test)
        new = model.after_aggregation(aggregated, previous, records, settings, server_round)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
        stage = model.schedule.stage(server_round, epochs)
        pushed = server_round == model.schedule.push_round(epochs)
        log.append(
            {
                "round": server_round,
                "stage": stage + (" + push" if pushed else ""),
                "test_accuracy": _accuracy(model, x_test, y_test),
                **({"test_accuracy_before_push": before_push} if pushed else {}),
            }
        )
        print(
            f"  protopnet round {server_round} ({log[-1]['stage']}): {log[-1]['test_accuracy']:.4f}",
            flush=True,
        )
    return {"rounds": log}


def _push_leakage(model: ProtoPNet, x: torch.Tensor, y: torch.Tensor, iterations: int) -> dict[str, Any]:
    """Invert every prototype's latent (now a real patch) back to its receptive-field window."""
    sources = push_candidates(model, x, y)
    psnrs, baselines, residuals = [], [], []
    for j in np.flatnonzero(sources.found):
        result = invert_latent_patch(
            model,
            model.prototype_vectors.detach()[j].flatten(),
            int(sources.row[j]),
            int(sources.col[j]),
            x[int(sources.sample[j])],
            iterations=iterations,
        )
        psnrs.append(result.psnr)
        baselines.append(result.baseline_psnr)
        residuals.append(result.latent_residual)
    return {
        "prototypes": len(psnrs),
        "max_source_distance": float(sources.distances[sources.found].max()),
        "iterations": iterations,
        "psnr_mean": float(np.mean(psnrs)),
        "psnr_median": float(np.median(psnrs)),
        "psnr_min": float(np.min(psnrs)),
        "psnr_max": float(np.max(psnrs)),
        "grey_guess_psnr_mean": float(np.mean(baselines)),
        "latent_residual_mean": float(np.mean(residuals)),
        "sources": sources,
    }


def _audit(model: ProtoPNet, samples: int, seed: int) -> dict[str, Any]:
    from fedsim.api import audit

    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "protopnet.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        start = time.perf_counter()
        result = audit(
            model="protopnet",
            dataset="fashion-mnist",
            samples=samples,
            attacks="layerwise,inverting-gradients",
            weights=weights,
            seed=seed,
            model_options=",".join(f"{key}={value}" for key, value in PROTOPNET_OPTIONS.items()),
        )
        seconds = time.perf_counter() - start
    report = result.architecture
    measured = [a.max_psnr for a in report.attacks if a.max_psnr is not None]
    return {
        "samples": samples,
        "security_score": report.score,
        "security_note": report.layerwise_note or None,
        "end_to_end_deficit": report.end_to_end_deficit,
        "psnr_ceiling": report.psnr_ceiling,
        "best_attack_psnr": max(measured) if measured else None,
        "attacks": [
            {"attack": a.attack, "mean_psnr": a.mean_psnr, "reconstructed": a.reconstructed}
            for a in report.attacks
        ],
        "push_disclosure": [d.to_dict() for d in report.disclosures],
        "seconds": seconds,
    }


def _one_seed(data, sizes: dict[str, int], seed: int) -> dict[str, Any]:
    """Pretrain, then the black box and ProtoPNet from the same pretrained backbone, on the
    seed's disjoint pretraining and task splits."""
    order = np.random.default_rng(seed).permutation(len(data.y_train))
    pre = order[: sizes["pretrain"]]
    task = order[sizes["pretrain"] : sizes["pretrain"] + sizes["task"]]
    x_pre, y_pre = torch.from_numpy(data.x_train[pre]), torch.from_numpy(data.y_train[pre])
    x, y = torch.from_numpy(data.x_train[task]), torch.from_numpy(data.y_train[task])
    x_test, y_test = (
        torch.from_numpy(data.x_test[: sizes["test"]]),
        torch.from_numpy(data.y_test[: sizes["test"]]),
    )
    torch.manual_seed(seed)
    protopnet = build_model("protopnet", data.spec, **PROTOPNET_OPTIONS)
    assert isinstance(protopnet, ProtoPNet)
    features = protopnet.features
    with torch.no_grad():
        latent_size = features(x[:1]).numel()
    pretrain = nn.Sequential(copy.deepcopy(features), nn.Flatten(), nn.Linear(latent_size, 10))
    print(f"seed {seed}: pretraining the backbone", flush=True)
    _train_plain(pretrain, x_pre, y_pre, sizes["pretrain_epochs"], seed)
    black_box = nn.Sequential(copy.deepcopy(pretrain[0]), nn.Flatten(), nn.Linear(latent_size, 10))
    print("training the black box", flush=True)
    black_box_curve = _train_plain(black_box, x, y, sizes["epochs"], seed, x_test, y_test)
    print(f"  black box: {black_box_curve[-1]:.4f}", flush=True)
    protopnet.features.load_state_dict(pretrain[0].state_dict())
    print("training ProtoPNet", flush=True)
    rounds = _train_protopnet(protopnet, x, y, sizes["epochs"], seed, x_test, y_test)["rounds"]
    proto_accuracy = rounds[-1]["test_accuracy"]
    return {
        "seed": seed,
        "pretrained_backbone_accuracy": _accuracy(pretrain, x_test, y_test),
        "black_box_accuracy": black_box_curve[-1],
        "black_box_per_epoch": black_box_curve,
        "protopnet_accuracy": proto_accuracy,
        "gap_points": 100 * (black_box_curve[-1] - proto_accuracy),
        "gap_to_best_black_box_epoch_points": 100 * (max(black_box_curve) - proto_accuracy),
        "protopnet_rounds": rounds,
        "model": protopnet,
        "task": (x, y),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small splits, few epochs")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the gap is their mean")
    parser.add_argument("--no-audit", action="store_true", help="skip the fedsim audit (the slowest part)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = _sizes(args.quick)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    data = load_dataset("fashion-mnist")
    runs = [_one_seed(data, sizes, seed) for seed in seeds]
    # What the push reveals, the picture and the audit: on the first seed's trained model.
    protopnet, (x, y) = runs[0]["model"], runs[0]["task"]
    for run in runs:
        del run["model"], run["task"]
    gaps = [run["gap_points"] for run in runs]
    gap = float(np.mean(gaps))

    print("inverting the pushed prototypes' latent patches", flush=True)
    leakage = _push_leakage(protopnet, x, y, iterations=100 if args.quick else 300)
    sources = leakage.pop("sources")
    figure = save_prototype_figure(protopnet, x, sources.sample, FIGURE, CLASS_NAMES)

    audit = None
    if not args.no_audit:
        print("auditing the trained ProtoPNet", flush=True)
        audit = _audit(protopnet, sizes["audit_samples"], seeds[0])

    result = {
        "claim": "ProtoPNet is about as accurate as its black-box backbone (Chen et al. 2019)",
        "goal": f"ProtoPNet within {GOAL_POINTS:g} points of the same backbone without prototypes "
        "(mean over seeds)",
        "quick": args.quick,
        "seeds": seeds,
        "sizes": sizes,
        "protopnet_options": PROTOPNET_OPTIONS,
        "optimiser": f"Adam lr {LR:g}, batch {BATCH}",
        "black_box_accuracy": float(np.mean([run["black_box_accuracy"] for run in runs])),
        "protopnet_accuracy": float(np.mean([run["protopnet_accuracy"] for run in runs])),
        "gap_points": gap,
        "gap_points_per_seed": gaps,
        "goal_met": gap <= GOAL_POINTS,
        "runs": runs,
        "push_leakage": leakage,
        "leakage": audit,
        "figure": str(figure.relative_to(ROOT)),
        "seconds": time.perf_counter() - started,
        "load_average": os.getloadavg()[0],
    }
    print_table(result)
    if not args.quick:
        OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {OUTPUT.relative_to(ROOT)}")


def print_table(result: dict[str, Any]) -> None:
    rows = []
    for run in result["runs"]:
        rows += [
            (
                f"seed {run['seed']}: black box (final / best epoch) | ProtoPNet",
                f"{run['black_box_accuracy']:.4f} / {max(run['black_box_per_epoch']):.4f} | "
                f"{run['protopnet_accuracy']:.4f}  (gap {run['gap_points']:.2f})",
            )
        ]
    rows += [
        (
            "mean gap (points)",
            f"{result['gap_points']:.2f} (goal <= {GOAL_POINTS:g}: "
            f"{'met' if result['goal_met'] else 'NOT met'})",
        ),
        (
            "push: patch PSNR mean / median",
            f"{result['push_leakage']['psnr_mean']:.1f} / {result['push_leakage']['psnr_median']:.1f} dB",
        ),
        ("push: grey-guess PSNR", f"{result['push_leakage']['grey_guess_psnr_mean']:.1f} dB"),
    ]
    audit = result["leakage"]
    if audit:
        rows += [
            ("audit: security score", str(audit["security_score"])),
            ("audit: end-to-end deficit", str(audit["end_to_end_deficit"])),
            ("audit: PSNR ceiling", f"{audit['psnr_ceiling']}"),
            ("audit: best attack PSNR", f"{audit['best_attack_psnr']}"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
