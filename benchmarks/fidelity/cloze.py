"""Cloze fidelity: the two-tower cloze model against a same-size left-to-right model.

Baevski et al. (EMNLP 2019) train a forward and a backward tower whose combination predicts
every token from both sides at once. At tiny scale, on `fortunes` (48-token texts, 5000-word
public vocabulary): `cloze` (direction=both, 2 layers per tower) and `cloze direction=forward`
(one causal tower of 4 layers; the same parameter count up to one LayerNorm), trained centrally
with the same optimiser, batches and seed; per epoch the held-out token-level loss (nats),
perplexity and fill-in accuracy (each non-padding test token predicted from the rest of its text,
for the forward model from its left context only). Goal: loss and perplexity fall, and the
cloze model's fill-in accuracy beats the unidirectional model's.

Usage: python -m benchmarks.fidelity.cloze [--epochs N]; writes
benchmarks/results/fidelity_cloze.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.paths import ROOT
from fedsim.data.registry import load_dataset
from fedsim.training.local import evaluate
from models import build_model

RESULT = ROOT / "benchmarks" / "results" / "fidelity_cloze.json"
SETTINGS: dict[str, Any] = {
    "dataset": "fortunes", "width": 64, "layers": 2, "heads": 2, "dropout": 0.0,
    "optimizer": "adam", "learning_rate": 0.003, "batch_size": 64, "epochs": 4, "seed": 0,
}  # fmt: skip


def train(direction: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Train one model centrally; held-out loss, perplexity and fill-in accuracy per epoch."""
    data = load_dataset(settings["dataset"])
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    torch.manual_seed(settings["seed"])
    options = {k: settings[k] for k in ("width", "layers", "heads", "dropout")}
    model = build_model("cloze", data.spec, direction=direction, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"])
    order = torch.Generator().manual_seed(settings["seed"])
    epochs: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, settings["epochs"] + 1):
        model.train()
        permutation = torch.randperm(len(x_train), generator=order)
        for begin in range(0, len(x_train), settings["batch_size"]):
            batch = permutation[begin : begin + settings["batch_size"]]
            optimizer.zero_grad(set_to_none=True)
            inputs = x_train[batch]
            loss = model.training_loss(model, inputs, model.sample_targets(inputs, y_train[batch]))
            loss.backward()
            optimizer.step()
        result = evaluate(model, x_test, y_test)
        epochs.append(
            {
                "epoch": epoch,
                "test_loss": round(result.loss, 4),
                "test_perplexity": round(math.exp(result.loss), 2),
                "fill_in_accuracy": round(result.metrics["accuracy"], 4),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(f"{direction} {epochs[-1]}", flush=True)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    settings = {**SETTINGS, "epochs": args.epochs}
    start = time.perf_counter()
    runs = {direction: train(direction, settings) for direction in ("both", "forward")}
    cloze, forward = runs["both"]["epochs"], runs["forward"]["epochs"]
    falls = all(r[-1]["test_loss"] < r[0]["test_loss"] for r in (cloze, forward))
    beats = cloze[-1]["fill_in_accuracy"] > forward[-1]["fill_in_accuracy"]
    result = {
        "settings": settings,
        "models": {"cloze": runs["both"], "forward": runs["forward"]},
        "goal": "held-out loss and perplexity fall; cloze fill-in accuracy > same-size forward model's",
        "goal_met": bool(falls and beats),
        "seconds": round(time.perf_counter() - start, 1),
        "platform": f"{platform.python_version()} torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | epoch | test loss | perplexity | fill-in accuracy |")
    print("|---|---|---|---|---|")
    for name, rows in (("cloze", cloze), ("forward", forward)):
        for row in rows:
            print(
                f"| {name} | {row['epoch']} | {row['test_loss']:.3f} | {row['test_perplexity']:.1f} "
                f"| {row['fill_in_accuracy']:.3f} |"
            )
    print(f"goal met: {result['goal_met']} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
