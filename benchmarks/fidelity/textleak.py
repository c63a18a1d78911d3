"""Text leakage fidelity: token-set and DAGER on FedSGD updates of fortunes sentences.

The issue's goal: token recovery with precision = recall = 1 on single-sequence updates of a
model with a trainable embedding. Workload: the tiny transformer (`models.tiny_transformer`:
token + learned positional embeddings of width 256, one attention block with Linear q/k/v,
padding masked, mean pool), seeded initial weights, exact batch-B gradients of fortunes test
sentences (48 tokens, 5,000-word public vocabulary), B in 1, 2, 4. Per attack: mean token
precision and recall, exact-sequence rate, ROUGE-1/2 F, BLEU (on decoded words) and seconds per
update, through the audit engine (`audits.scoring.engine.UpdateAuditor`) as `fedsim audit` runs it.
A causal variant (B 2, 4) lets DAGER grow the sequences prefix by prefix; a last workload
freezes the embedding: token-set declines, DAGER tests the whole vocabulary. The causal and
frozen workloads use a quarter of the updates (they cost seconds each).

Usage: python -m benchmarks.fidelity.textleak [--updates N]; writes
benchmarks/results/fidelity_textleak.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import observe_gradient
from audits.scoring.engine import AuditContext, Truth, UpdateAuditor, threat_model
from benchmarks.paths import ROOT
from fedsim.data.registry import DATASETS
from models.tiny_transformer import tiny_transformer

RESULT = ROOT / "benchmarks" / "results" / "fidelity_textleak.json"
METRICS = ("token_precision", "token_recall", "exact_sequence", "rouge1", "rouge2", "bleu", "seconds")


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def run(batch: int, updates: int, frozen: bool, causal: bool, seed: int = 0) -> dict[str, Any]:
    data = DATASETS["fortunes"].load()
    torch.manual_seed(seed)
    model = tiny_transformer(data.spec, frozen_embedding=frozen, causal=causal)
    auditor = UpdateAuditor(["token-set", "dager"], data.tokenizer.decode)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {}
    for k in range(updates):
        chosen = rng.choice(len(data.y_test), size=batch, replace=False)
        x, y = data.x_test[chosen], data.y_test[chosen]
        update = observe_gradient(model, torch.from_numpy(x), torch.from_numpy(y))
        audit = auditor.audit(update, Truth(x, y), AuditContext(threat_model(batch, 1, exact=True), sample=k))
        for row in audit.rows:
            rows.setdefault(row.attack, []).append(row)
    out: dict[str, Any] = {}
    for attack, attack_rows in rows.items():
        reconstructed = [r for r in attack_rows if r.status == "reconstructed"]
        out[attack] = {
            "reconstructed": f"{len(reconstructed)}/{len(attack_rows)}",
            **{m: _mean([getattr(r, m) for r in reconstructed]) for m in METRICS},
            "note": attack_rows[0].note[:160],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20, help="updates per batch size")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    workloads = []
    for frozen, causal, batches in ((False, False, (1, 2, 4)), (False, True, (2, 4)), (True, False, (1,))):
        for batch in batches:
            updates = args.updates if not (frozen or causal) else max(1, args.updates // 4)
            workloads.append(
                {
                    "embedding": "frozen" if frozen else "trainable",
                    "causal": causal,
                    "batch": batch,
                    "updates": updates,
                    "attacks": run(batch, updates, frozen, causal),
                }
            )
    single = next(w for w in workloads if w["batch"] == 1 and w["embedding"] == "trainable")["attacks"]
    goal_met = all(
        single[a]["token_precision"] == 1.0 and single[a]["token_recall"] == 1.0
        for a in ("token-set", "dager")
    )
    report = {
        "settings": {
            "dataset": "fortunes (test split)",
            "model": "tiny-transformer width 256",
            "threat": "exact FedSGD gradient",
            "updates": args.updates,
            "platform": platform.platform(),
            "threads": 1,
        },
        "workloads": workloads,
        "goal": "token precision = recall = 1 on single-sequence updates (trainable embedding)",
        "goal_met": goal_met,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    header = ["embedding", "causal", "B", "attack", "reconstructed", "precision", "recall", "exact"]
    print("| " + " | ".join([*header, "ROUGE-1", "ROUGE-2", "BLEU", "s/update"]) + " |")
    print("|---" * 12 + "|")
    for w in workloads:
        for attack, r in w["attacks"].items():
            cells = [_fmt(r[m]) for m in METRICS]
            print(
                f"| {w['embedding']} | {w['causal']} | {w['batch']} | {attack} | {r['reconstructed']} | "
                + " | ".join(cells)
                + " |"
            )
    print(f"goal met: {goal_met}; {report['seconds']:.0f} s")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
