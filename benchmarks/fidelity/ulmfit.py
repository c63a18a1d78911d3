"""ULMFiT fidelity: does language-model pretraining beat training from scratch when labels are few?

Howard & Ruder (ACL 2018) claim that a general-domain LM, fine-tuned as an LM on the target
text and then as a classifier (discriminative rates, STLR, gradual unfreezing), beats a
classifier trained from scratch, most of all with few labels. At tiny scale, on `fortunes`
(6 classes) with `LABELS_PER_CLASS` labelled training texts per class:

- scratch: the classifier stage alone (gradual unfreezing, discriminative rates, STLR) from a
  random initialisation;
- target LM: target-LM fine-tuning on every fortunes training text (labels unused, ULMFiT's
  semi-supervised setting), then the same classifier stage;
- KJV + target LM: the same, starting from an LM pretrained on all KJV verses encoded with the
  fortunes tokenizer (so token ids agree), saved and loaded as safetensors (`pretrained=`).

Each is one client's local rounds through the model's own hooks (`configure_optimizer`,
`before_local_training`, `training_loss`, `after_aggregation` with one reply), the same path a
federation takes, without the simulation's start-up cost. Goal: KJV + target LM accuracy >
scratch accuracy, mean over seeds. Usage: python -m benchmarks.fidelity.ulmfit [--quick];
writes benchmarks/results/fidelity_ulmfit.json and prints a Markdown table.
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
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.paths import ROOT
from fedsim.data.corpora import kjv_verses
from fedsim.data.registry import load_dataset
from models import TrainingSettings, build_model
from models.ulmfit import ULMFiT, pretrain_language_model, save_pretrained

RESULT = ROOT / "benchmarks" / "results" / "fidelity_ulmfit.json"
SETTINGS: dict[str, Any] = {
    "labels_per_class": 50,
    "pretrain_verses": 31102,
    "pretrain_epochs": 1,
    "pretrain_lr": 0.01,
    "lm_rounds": 2,
    "lm_lr": 0.01,
    "classifier_rounds": 20,
    "classifier_lr": 0.01,
    "batch_size": 32,
    "seeds": [0, 1],
}
QUICK = {**SETTINGS, "pretrain_verses": 2000, "lm_rounds": 1, "classifier_rounds": 4, "seeds": [0]}


def train_rounds(
    model: ULMFiT, x: torch.Tensor, y: torch.Tensor, clock: int, lr: float, seed: int, run: int | None = None
) -> None:
    """The first `run` (default all) rounds of a `clock`-round run of one client (the model's
    stages decide what each round trains), each followed by the server's `after_aggregation`
    of the one reply."""
    settings = TrainingSettings(learning_rate=lr, rounds=clock, batch_size=SETTINGS["batch_size"])
    for server_round in range(1, (run or clock) + 1):
        torch.manual_seed(seed * 1000 + server_round)
        previous = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        optimizer = model.configure_optimizer(settings, server_round)
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=settings.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed * 1000 + server_round),
        )
        model.before_local_training(loader, server_round)
        model.train()
        for inputs, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            model.training_loss(model, inputs, labels).backward()
            optimizer.step()
        model.after_local_training(loader, server_round)
        local = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        merged = model.after_aggregation(local, previous, [], settings, server_round)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})


@torch.no_grad()
def accuracy(model: ULMFiT, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (not the reported numbers)")
    parser.add_argument("--pretrained", help="reuse a KJV LM file this script saved before (skips stage 1)")
    args = parser.parse_args()
    settings = QUICK if args.quick else SETTINGS
    SETTINGS["batch_size"] = settings["batch_size"]
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset("fortunes")
    x_all, y_all = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)

    # Stage 1, once: a KJV language model in the fortunes vocabulary.
    kjv = torch.as_tensor(data.tokenizer.encode(list(kjv_verses().texts)))
    kjv = kjv[(kjv != 0).sum(dim=1) >= 2]  # a next-token target needs two tokens
    kjv = kjv[: settings["pretrain_verses"]]
    history: list[float] = []
    pretrain_seconds = 0.0
    if args.pretrained:
        lm_file = Path(args.pretrained)
        print(f"KJV LM: reusing {lm_file}")
    else:
        torch.manual_seed(0)
        general = build_model("ulmfit", data.spec)
        assert isinstance(general, ULMFiT)
        pretrain_start = time.perf_counter()
        history = pretrain_language_model(
            general, kjv, settings["pretrain_epochs"], settings["pretrain_lr"], 64, 0
        )
        pretrain_seconds = time.perf_counter() - pretrain_start
        losses = [round(h, 3) for h in history]
        print(f"KJV LM: {len(kjv)} verses, loss per epoch {losses}, {pretrain_seconds:.0f} s")
        lm_file = Path(tempfile.mkdtemp(prefix="ulmfit-")) / "kjv_lm.safetensors"
        save_pretrained(general, lm_file)

    rows: list[dict[str, Any]] = []
    variants = {"scratch": (False, False), "target LM": (False, True), "KJV + target LM": (True, True)}
    for seed in settings["seeds"]:
        rng = np.random.default_rng(seed)
        chosen = np.concatenate(
            [
                rng.choice(np.flatnonzero(data.y_train == k), settings["labels_per_class"], replace=False)
                for k in range(data.spec.num_classes)
            ]
        )
        x_few, y_few = x_all[chosen], y_all[chosen]
        for variant, (use_kjv, use_lm) in variants.items():
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            options = {"pretrained": str(lm_file)} if use_kjv else {}
            model = build_model("ulmfit", data.spec, lm_rounds=settings["lm_rounds"], **options)
            assert isinstance(model, ULMFiT)
            if use_lm:  # target LM fine-tuning on all training texts, labels unused
                # the LM stage is the first half of a 2m-round clock; only those m rounds run
                m = settings["lm_rounds"]
                train_rounds(model, x_all, y_all, 2 * m, settings["lm_lr"], seed, run=m)
            classifier = build_model("ulmfit", data.spec, lm_rounds=0)
            classifier.load_state_dict(model.state_dict())
            assert isinstance(classifier, ULMFiT)
            rounds, lr = settings["classifier_rounds"], settings["classifier_lr"]
            train_rounds(classifier, x_few, y_few, rounds, lr, seed)
            acc = accuracy(classifier, x_test, y_test)
            rows.append({"variant": variant, "seed": seed, "accuracy": round(acc, 4),
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(f"seed {seed} {variant}: accuracy {acc:.4f} ({rows[-1]['seconds']} s)", flush=True)

    means = {v: float(np.mean([r["accuracy"] for r in rows if r["variant"] == v])) for v in variants}
    goal_met = means["KJV + target LM"] > means["scratch"]
    print("\n| variant | test accuracy (mean over seeds) |\n|---|---|")
    for variant, value in means.items():
        print(f"| {variant} | {value:.4f} |")
    result = {
        "claim": "LM pretraining (KJV, then target LM fine-tuning) beats training from scratch "
        "with few labels",
        "dataset": "fortunes",
        "settings": settings,
        "quick": args.quick,
        "kjv_verses": len(kjv),
        "pretrained_reused": bool(args.pretrained),
        "kjv_lm_loss_per_epoch": [round(h, 4) for h in history],
        "pretrain_seconds": round(pretrain_seconds, 1),
        "rows": rows,
        "mean_accuracy": {k: round(v, 4) for k, v in means.items()},
        "goal": "mean accuracy of KJV + target LM > scratch",
        "goal_met": bool(goal_met),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"goal met: {goal_met}; wrote {RESULT}")


if __name__ == "__main__":
    main()
