"""Text DNN fidelity (de Andrade 2019): does a deep, layer-wise pretrained net beat an RBF-SVM on
the same LSA features, and what does Nesterov's momentum change?

On `fortunes-lsa` (100 standardised TF-IDF -> LSA features fitted on a public corpus, 6 balanced
classes, 2784 train / 696 test texts), with the identical feature matrix for every method:

- (a) RBF-SVM (scikit-learn SVC), C and gamma chosen by 3-fold cross-validation on train only;
- (b) a 1-hidden-layer net, (c) the deep net without pretraining, (d) the deep net with greedy
  denoising-autoencoder pretraining (one "round" = one epoch per layer), each with Nesterov and
  with plain momentum SGD (same learning rate and momentum).

The nets are trained centrally (one client holding the whole train split: no federation noise,
so the comparison is of methods), through the model's own contract calls: the round's
`configure_optimizer(settings, round)` and `training_loss`, one epoch per round, as a client
would run them, so the pretraining phases are exactly the federated schedule. Test accuracy and
macro-F1 over several seeds. Goal: the pretrained deep net beats the RBF-SVM.

With `--federated` the pretrained deep net is also trained by FedAvg through `fedsim.api.run`
(FEDERATED settings, IID clients, one local epoch per round, Nesterov and plain momentum), its
final global model scored on the same test split.

Usage: python -m benchmarks.fidelity.text_dnn [--quick] [--federated]; writes
benchmarks/results/fidelity_text_dnn.json and prints a Markdown table.
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
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig
from fedsim.data import Dataset
from fedsim.data.registry import load_dataset
from fedsim.store.audit_folder import load_weights
from fedsim.training.run_model import build_run_model
from models import TrainingSettings, build_model, parse_model_options
from models.text_dnn import TextDNN

RESULT = ROOT / "benchmarks" / "results" / "fidelity_text_dnn.json"
DATASET = "fortunes-lsa"
SVM_GRID: dict[str, list[Any]] = {"C": [1.0, 3.0, 10.0, 30.0], "gamma": ["scale", 0.003, 0.01]}
SETTINGS = {"learning_rate": 0.01, "momentum": 0.9, "batch_size": 32, "rounds": 12, "seeds": [0, 1, 2]}
QUICK = {**SETTINGS, "rounds": 8, "seeds": [0]}
FEDERATED = {
    "dataset": DATASET, "clients": 4, "rounds": 12, "local_epochs": 1, "batch_size": 32,
    "learning_rate": 0.01, "momentum": 0.9, "fraction_evaluate": 0.0, "seed": 0,
}  # fmt: skip
NETS: dict[str, str] = {
    "1-layer net": "widths=256,pretrain_rounds_per_layer=0",
    "deep net, no pretraining": "widths=256-256-256,pretrain_rounds_per_layer=0",
    "deep net, DAE pretraining": "widths=256-256-256,pretrain_rounds_per_layer=2,noise=0.5",
}


def features() -> Dataset:
    """The one feature matrix every method consumes: the registered dataset's own arrays."""
    return load_dataset(DATASET)


def fit_svm(x: np.ndarray, y: np.ndarray, grid: dict[str, list[Any]] = SVM_GRID) -> SVC:
    """RBF-SVM with C and gamma picked by 3-fold cross-validation on the training data only."""
    search = GridSearchCV(SVC(kernel="rbf"), grid, cv=3)
    search.fit(x, y)
    return search.best_estimator_


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, average="macro")), 4),
    }


def train_net(data: Dataset, options: str, nesterov: bool, seed: int, settings: dict[str, Any]) -> TextDNN:
    """Central training through the contract: per round a fresh optimiser from
    `configure_optimizer` (phase, frozen groups, Nesterov) and one epoch of `training_loss`."""
    torch.manual_seed(seed)
    parsed = parse_model_options("text-dnn", f"{options},nesterov={str(nesterov).lower()}")
    model = build_model("text-dnn", data.spec, **parsed)
    assert isinstance(model, TextDNN)
    train = TrainingSettings(
        settings["learning_rate"],
        settings["momentum"],
        rounds=settings["rounds"],
        batch_size=settings["batch_size"],
    )
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    order = torch.Generator().manual_seed(seed)
    for server_round in range(1, train.rounds + 1):
        optimizer = model.configure_optimizer(train, server_round)
        model.train()
        permutation = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), train.batch_size):
            batch = permutation[start : start + train.batch_size]
            optimizer.zero_grad(set_to_none=True)
            model.training_loss(model, x[batch], model.targets(y[batch])).backward()
            optimizer.step()
    model.eval()
    return model


def predict(model: TextDNN, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x)).argmax(dim=-1).numpy()


def train_federated(data: Dataset, options: str, nesterov: bool, runs: Path) -> dict[str, Any]:
    """One FedAvg federation of the text DNN; the final global model's test scores and the server
    accuracy per round (the pretraining rounds sit near chance: the head is not trained yet)."""
    options = f"{options},nesterov={str(nesterov).lower()}"
    name = f"text-dnn-{'nesterov' if nesterov else 'plain'}"
    mapping = {**FEDERATED, "model": "text-dnn", "model_options": options, "name": name}
    config = RunConfig.from_mapping(mapping)
    result = fedsim.run(config, runs_dir=runs)
    model = build_run_model(config.model, data.spec, options)
    load_weights(model, result.checkpoints[-1])
    model.eval()
    assert isinstance(model, TextDNN)
    server = result.metrics[result.metrics["stage"] == "server"]
    return {
        **scores(data.y_test, predict(model, data.x_test)),
        "server_accuracy_per_round": [round(float(a), 4) for a in server["eval_accuracy"]],
    }


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "runs": runs,
        **{f"{k}_mean": round(float(np.mean([r[k] for r in runs])), 4) for k in ("accuracy", "macro_f1")},
        **{f"{k}_std": round(float(np.std([r[k] for r in runs])), 4) for k in ("accuracy", "macro_f1")},
    }


def measure(settings: dict[str, Any], quick: bool, federated: bool) -> dict[str, Any]:
    start = time.perf_counter()
    data = features()
    svm = fit_svm(data.x_train, data.y_train)
    rows: dict[str, Any] = {
        "RBF-SVM": {
            **summarise([scores(data.y_test, svm.predict(data.x_test))]),
            "params": {"C": svm.C, "gamma": svm.gamma},
        }
    }
    for label, options in NETS.items():
        for nesterov in (True, False):
            runs = []
            for seed in settings["seeds"]:
                model = train_net(data, options, nesterov, seed, settings)
                runs.append(scores(data.y_test, predict(model, data.x_test)))
            rows[f"{label}, {'Nesterov' if nesterov else 'plain momentum'}"] = {
                **summarise(runs),
                "options": options,
                "nesterov": nesterov,
            }
    if federated:
        with tempfile.TemporaryDirectory(prefix="fidelity-text-dnn-") as tmp:
            for nesterov in (True, False):
                outcome = train_federated(data, NETS["deep net, DAE pretraining"], nesterov, Path(tmp))
                curve = outcome.pop("server_accuracy_per_round")
                label = f"deep net, DAE pretraining, FedAvg, {'Nesterov' if nesterov else 'plain momentum'}"
                rows[label] = {**summarise([outcome]), "server_accuracy_per_round": curve}
    svm_accuracy = rows["RBF-SVM"]["accuracy_mean"]
    best_pretrained = max(
        rows[f"deep net, DAE pretraining, {kind}"]["accuracy_mean"] for kind in ("Nesterov", "plain momentum")
    )
    nesterov_effect = {
        label: round(
            rows[f"{label}, Nesterov"]["accuracy_mean"] - rows[f"{label}, plain momentum"]["accuracy_mean"], 4
        )
        for label in NETS
    }
    return {
        "claim": "a deep net with greedy layer-wise pretraining beats an RBF-SVM on the same LSA features",
        "dataset": DATASET,
        "training": "central (one client, whole train split) through configure_optimizer/training_loss",
        "federated": FEDERATED if federated else None,
        "settings": settings,
        "svm_grid": SVM_GRID,
        "rows": rows,
        "nesterov_minus_plain_accuracy": nesterov_effect,
        "goal": "pretrained deep net mean test accuracy > RBF-SVM test accuracy",
        "goal_met": bool(best_pretrained > svm_accuracy),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "quick": quick,
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| method | test accuracy | macro-F1 |", "|---|---|---|"]
    for label, row in result["rows"].items():
        lines.append(
            f"| {label} | {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} % "
            f"| {row['macro_f1_mean']:.3f} ± {row['macro_f1_std']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (fewer rounds, one seed)")
    parser.add_argument("--federated", action="store_true", help="also train the pretrained net by FedAvg")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the JSON")
    args = parser.parse_args()
    result = measure(QUICK if args.quick else SETTINGS, args.quick, args.federated)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(table(result))
    print(
        f"\nNesterov − plain (accuracy): {result['nesterov_minus_plain_accuracy']}; goal met: "
        f"{result['goal_met']}; {result['seconds']:.0f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
