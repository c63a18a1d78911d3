"""Fidelity of the splash-drop FNN (Yee, Yamanaka & Tagawa, arXiv 2201.09541) at small scale.

The paper's claims, checked on the procedural drops of `fedsim/data/splash.py`:

* accuracy: an FNN tells splash from no splash at > 96 % test accuracy, and still > 82 % when
  retrained on the main body only (ejected droplets removed): zero and one hidden layer, trained
  centrally (Adam, as the paper's network) on `splash` and `splash-body`;
* weight map: the splash-class weights, as an image, highlight the contour of the drop's main
  body. Measured as the mean |weight| per pixel in a band of ±BAND_PX around the main body's
  contour (the 0.5 level of its mean coverage over the test drops, the flat base on the surface
  excluded) over the mean |weight| per pixel elsewhere above the surface; the untrained net gives
  the ratio chance would. The maps are saved as PNGs beside the JSON;
* federated: FedAvg (`fedsim run`) with IID clients and with clients holding contiguous
  impact-height ranges (the `covariate` partitioner: a label shift);
* leakage: `fedsim audit` of the default model (zero hidden layers): security score, end-to-end
  deficit, PSNR ceiling and the best attack PSNR.

Usage: python -m benchmarks.fidelity.splash [--quick] [--output PATH];
writes benchmarks/results/fidelity_splash.json (with --quick only when --output is given).
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
from scipy import ndimage
from torch.nn import functional as F

from benchmarks.paths import ROOT
from fedsim.api import audit, run
from fedsim.config.partition_spec import PartitionSpec
from fedsim.data import load_dataset
from fedsim.data.dataset import SPLIT_SEED, Dataset
from fedsim.data.partition import partition
from fedsim.data.registry import SPLASH_TEST_COUNT
from fedsim.data.splash import SUBSTRATE_ROW, body_coverage, sample_drops
from models import build_model
from models.splash_fnn import SplashFNN, save_weight_map

RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = RESULTS / "fidelity_splash.json"
GOALS = {"splash": 0.96, "splash-body": 0.82}
BAND_PX = 2.0
HIDDEN = (0, 16)
SEED = 0
THREADS = 1  # the shared 2-core machine: one torch thread per process


def train_centrally(data: Dataset, hidden: int, epochs: int) -> tuple[SplashFNN, float]:
    """Adam (lr 1e-3, batch 32) for `epochs` epochs; returns the model and its test accuracy."""
    torch.manual_seed(SEED)
    model = build_model("splash-fnn", data.spec, hidden=hidden)
    assert isinstance(model, SplashFNN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()
    return model, float((predicted == data.y_test).mean())


def contour_band() -> tuple[np.ndarray, np.ndarray]:
    """(band, elsewhere): boolean masks above the surface, the band within BAND_PX of the main
    body's mean contour (its curved part: the flat base on the surface is no contour)."""
    drops = sample_drops(SPLASH_TEST_COUNT, SPLIT_SEED + 1)  # the test split's drops
    body = body_coverage(drops).mean(axis=0) >= 0.5
    edge = body & ~ndimage.binary_erosion(body, border_value=0)
    edge[SUBSTRATE_ROW - 1 :] = False
    distance = ndimage.distance_transform_edt(~edge)
    above = np.zeros_like(body)
    above[:SUBSTRATE_ROW] = True
    band = above & (distance <= BAND_PX)
    return band, above & ~band


def band_ratio(weight_map: np.ndarray, band: np.ndarray, elsewhere: np.ndarray) -> float:
    magnitude = np.abs(weight_map)
    return float(magnitude[band].mean() / magnitude[elsewhere].mean())


def accuracy_and_maps(epochs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    band, elsewhere = contour_band()
    rows, maps = [], {}
    for dataset in GOALS:
        data = load_dataset(dataset)
        for hidden in HIDDEN:
            start = time.perf_counter()
            model, accuracy = train_centrally(data, hidden, epochs)
            weight_map = model.class_weight_map()
            rows.append(
                {
                    "dataset": dataset,
                    "hidden": hidden,
                    "epochs": epochs,
                    "test_accuracy": accuracy,
                    "goal": GOALS[dataset],
                    "met": accuracy > GOALS[dataset],
                    "contour_band_ratio": band_ratio(weight_map, band, elsewhere),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"{dataset:12s} hidden={hidden:2d}: accuracy {accuracy:.4f} (goal > {GOALS[dataset]})")
            if hidden == 0:
                name = f"{dataset.replace('-', '_')}_weight_map.png"
                save_weight_map(weight_map, RESULTS / name, f"splash-class weights ({dataset})")
                maps[dataset] = {"png": f"benchmarks/results/{name}", "ratio": rows[-1]["contour_band_ratio"]}
    torch.manual_seed(SEED)
    untrained = build_model("splash-fnn", load_dataset("splash").spec)
    assert isinstance(untrained, SplashFNN)
    weight_map = {
        "band_px": BAND_PX,
        "band_pixels": int(band.sum()),
        "elsewhere_pixels": int(elsewhere.sum()),
        "maps": maps,
        "untrained_ratio": band_ratio(untrained.class_weight_map(), band, elsewhere),
    }
    return rows, weight_map


def federated(rounds: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for partitioner in ("iid", "covariate"):
            config = {
                "name": partitioner, "dataset": "splash", "model": "splash-fnn",
                "partitioner": partitioner, "clients": 4, "rounds": rounds, "local-epochs": 1,
                "max-local-steps": steps, "learning-rate": 0.01, "seed": SEED,
            }  # fmt: skip
            start = time.perf_counter()
            result = run(config, runs_dir=folder)
            server = result.metrics[result.metrics["stage"] == "server"]
            data = load_dataset("splash")
            parts = partition(data.y_train, PartitionSpec(partitioner, 4, seed=SEED), data.covariate_train)
            rows.append(
                {
                    "partitioner": partitioner,
                    "clients": 4,
                    "rounds": rounds,
                    "max_local_steps": steps,
                    "learning_rate": 0.01,
                    "client_splash_share": [round(float(data.y_train[p].mean()), 3) for p in parts],
                    "accuracy_per_round": [round(float(a), 4) for a in server["eval_accuracy"]],
                    "final_accuracy": float(server["eval_accuracy"].iloc[-1]),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"FedAvg {partitioner:9s}: accuracy per round {rows[-1]['accuracy_per_round']}")
    return rows


def leakage(samples: int) -> dict[str, Any]:
    result = audit(
        model="splash-fnn", dataset="splash", samples=samples, attacks="layerwise,inverting-gradients"
    )
    report = result.architecture
    best = max((o.max_psnr for o in report.attacks if o.max_psnr is not None), default=None)
    summary = {
        "model": "splash-fnn (hidden=0)",
        "samples": samples,
        "security_score": report.score,
        "end_to_end_deficit": report.end_to_end_deficit,
        "psnr_ceiling": report.psnr_ceiling,
        "best_attack_psnr": best,
        "attacks": {o.attack: o.mean_psnr for o in report.attacks},
    }
    print(f"leakage: {summary}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 2 rounds, 1 audited sample")
    parser.add_argument("--epochs", type=int, default=10, help="central training epochs")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    epochs = 1 if args.quick else args.epochs
    start = time.perf_counter()
    accuracy, weight_map = accuracy_and_maps(epochs)
    results = {
        "settings": {
            "quick": args.quick,
            "seed": SEED,
            "threads": THREADS,
            "python": platform.python_version(),
        },
        "accuracy": accuracy,
        "weight_map": weight_map,
        "federated": federated(rounds=2 if args.quick else 5, steps=10 if args.quick else 30),
        "leakage": leakage(samples=1 if args.quick else 3),
    }
    results["seconds"] = time.perf_counter() - start
    print(json.dumps({"weight_map": weight_map}, indent=1))
    output = args.output or (None if args.quick else OUTPUT)
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
