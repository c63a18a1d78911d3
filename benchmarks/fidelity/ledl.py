"""LEDL fidelity: a federated LEDL run equals centralised LEDL, and what its statistics reveal.

Shao et al. (Neurocomputing 2020) train LEDL centrally: ADMM for the ℓ1 codes, blockwise
coordinate descent for B, W, A. Federated here (`models.ledl`): clients code their samples with
the global B, W, A and send CCᵀ, XCᵀ, YCᵀ; the server sums them and runs the coordinate-descent
step. Claim: the federated solution equals the centralised one to numerical tolerance.

Fidelity: a real federation on `digits` (fedsim's run API, K clients, R rounds) against the same
model (same seed, same initial B, W, A) iterated R times centrally on the union of the clients'
training samples; per round, max |B_fed − B_cen| (and W, A) and both test accuracies.
Goal: every gap below 1e-8 and equal accuracies.

Audit: a client's statistics inverted (`attacks.disclosure.statistics`) at the trained model:
(a) a client holding one test sample: PSNR of the recovered sample; (b) a client holding one
sample of each class: mean PSNR over the ten; (c) a client holding 5 samples per class: each
class's recovered image against the nearest of its samples (a mixture, not a sample).

Usage: python -m benchmarks.fidelity.ledl [--quick]; writes benchmarks/results/fidelity_ledl.json
and prints a Markdown table.
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
from attacks.disclosure.statistics import invert_statistics
from audits.similarity.image import reported_psnr
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.data.registry import load_dataset
from fedsim.store.audit_folder import load_weights
from fedsim.training.run_model import build_run_model
from models.ledl import Ledl

RESULT = ROOT / "benchmarks" / "results" / "fidelity_ledl.json"
TRAIN = {"dataset": "digits", "model": "ledl", "clients": 4, "rounds": 8, "fraction_evaluate": 0.0, "seed": 0}
QUICK_TRAIN = {**TRAIN, "rounds": 3}
GOAL_GAP = 1e-8


def fresh_model(config: RunConfig) -> Ledl:
    """The run's model as `fedsim.training.local.model_for` builds it (the run seed, then build)."""
    data = load_dataset(config.dataset)
    torch.manual_seed(config.seed)
    model = build_run_model(config.model, data.spec, config.model_options)
    assert isinstance(model, Ledl)
    return model


def test_accuracy(model: Ledl, data: Any) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
    return float((predicted == data.y_test).mean())


def fidelity(config: RunConfig, runs: Path) -> dict[str, Any]:
    data = load_dataset(config.dataset)
    start = time.perf_counter()
    result = fedsim.run(config, runs_dir=runs)
    federated_seconds = time.perf_counter() - start
    server = result.metrics[result.metrics["stage"] == "server"]
    round_seconds = [float(s) for s in server["seconds"].iloc[1:]]
    clients = [client_data(config, pid) for pid in range(config.num_clients)]
    x = torch.cat([c.x_train for c in clients])
    y = torch.cat([c.y_train for c in clients])
    centralised, federated = fresh_model(config), fresh_model(config)
    rows = []
    start = time.perf_counter()
    central_seconds = []
    for rnd, checkpoint in enumerate(result.checkpoints):
        if rnd > 0:
            tick = time.perf_counter()
            centralised.centralised_step(x, y)
            central_seconds.append(time.perf_counter() - tick)
        load_weights(federated, checkpoint)
        gaps = {
            name: float((getattr(federated, name) - getattr(centralised, name)).abs().max())
            for name in ("B", "W", "A")
        }
        rows.append(
            {
                "round": rnd,
                **{f"max_gap_{k}": v for k, v in gaps.items()},
                "accuracy_federated": test_accuracy(federated, data),
                "accuracy_centralised": test_accuracy(centralised, data),
            }
        )
    return {
        "rows": rows,
        "samples": len(y),
        "federated_run_seconds": round(federated_seconds, 1),
        "federated_round_seconds_mean": round(float(np.mean(round_seconds)), 2),
        "centralised_iteration_seconds_mean": round(float(np.mean(central_seconds)), 2),
        "model": federated,
    }


def inversion_psnr(model: Ledl, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per class present: PSNR of the recovered image against the nearest of that class's samples,
    and the recovered classes."""
    stats = model.statistics(x, y)
    recovered, classes = invert_statistics(stats.xct.numpy(), stats.yct.numpy())
    truth = x.double().numpy()
    scores = []
    for column, cls in enumerate(classes):
        own = truth[y.numpy() == cls]
        guess = np.clip(np.repeat(recovered[:, column].reshape(1, *own.shape[1:]), len(own), 0), 0, 1)
        scores.append(float(reported_psnr(own, guess).max()))
    return np.array(scores), classes


def audit(model: Ledl, data: Any) -> dict[str, Any]:
    x, y = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    one = inversion_psnr(model, x[:1], y[:1])[0]
    per_class = np.concatenate([np.flatnonzero(data.y_test == c)[:1] for c in range(10)])
    ten = inversion_psnr(model, x[per_class], y[per_class])[0]
    five = np.concatenate([np.flatnonzero(data.y_test == c)[:5] for c in range(10)])
    fifty = inversion_psnr(model, x[five], y[five])[0]
    grey = float(reported_psnr(x[:1].double().numpy(), np.full((1, 1, 8, 8), 0.5)).mean())
    return {
        "one_sample_psnr": round(float(one[0]), 1),
        "one_per_class_mean_psnr": round(float(ten.mean()), 1),
        "five_per_class_best_match_mean_psnr": round(float(fifty.mean()), 1),
        "grey_guess_psnr": round(grey, 1),
    }


def table(fid: dict[str, Any], leak: dict[str, Any]) -> str:
    lines = [
        "| round | max abs B gap | max abs W gap | max abs A gap | acc federated | acc centralised |",
        "|---|---|---|---|---|---|",
    ]
    for r in fid["rows"]:
        lines.append(
            f"| {r['round']} | {r['max_gap_B']:.1e} | {r['max_gap_W']:.1e} | {r['max_gap_A']:.1e} "
            f"| {r['accuracy_federated']:.4f} | {r['accuracy_centralised']:.4f} |"
        )
    lines += [
        "",
        "| client holds | PSNR of recovery (dB) |",
        "|---|---|",
        f"| 1 sample | {leak['one_sample_psnr']} |",
        f"| 1 sample per class (10) | {leak['one_per_class_mean_psnr']} (mean) |",
        f"| 5 samples per class (50) | {leak['five_per_class_best_match_mean_psnr']} (mean, best match) |",
        f"| (grey guess) | {leak['grey_guess_psnr']} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 8")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the JSON")
    args = parser.parse_args()
    settings = QUICK_TRAIN if args.quick else TRAIN
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        config = RunConfig.from_mapping({**settings, "name": "ledl-fidelity"})
        fid = fidelity(config, Path(runs))
    data = load_dataset(config.dataset)
    leak = audit(fid.pop("model"), data)
    worst = max(max(r["max_gap_B"], r["max_gap_W"], r["max_gap_A"]) for r in fid["rows"])
    same_accuracy = all(r["accuracy_federated"] == r["accuracy_centralised"] for r in fid["rows"])
    result = {
        "settings": {**settings, "quick": args.quick},
        "fidelity": fid,
        "audit": leak,
        "goal": f"federated B, W, A within {GOAL_GAP:g} of centralised every round, equal accuracy",
        "max_gap": worst,
        "goal_met": bool(worst < GOAL_GAP and same_accuracy),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(fid, leak))
    print(f"\nworst gap {worst:.1e}, goal met: {result['goal_met']}; {result['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
