"""What a client's reply weighs, round by round, now that it sends `sent_names(round)` only.

ULMFiT at its default sizes on `fortunes` (5000-word vocabulary): a run of 8 rounds, the first 2
fine-tuning the language model, then classifier fine-tuning with gradual unfreezing (round 3:
the classifier alone, each later round one more group, from round 6 on all four classifier-stage
groups; the decoder never trains there). Each round one client trains one local step from the
initial global model and packs its reply's ArrayRecord exactly as the ClientApp does; we count
its arrays, their payload bytes (float32 values) and their serialised bytes (what Flower ships:
.npy with a header per array), against the whole federated model. `random-features` on `digits`
shows the other half of the seam: a federated model (the readout) smaller than the state dict.

Run: `python -m benchmarks.performance.seam_bytes` (about a minute);
writes benchmarks/results/seam_bytes.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.training.local import model_for, train_locally
from models.base import federated_state, load_federated_state

RESULTS = Path(__file__).parent / "results" / "seam_bytes.json"
ULMFIT = RunConfig(
    model="ulmfit", dataset="fortunes", num_clients=2, rounds=8, local_epochs=1, max_local_steps=1,
    batch_size=16, learning_rate=0.01,
)  # fmt: skip
RANDOM_FEATURES = RunConfig(model="random-features", num_clients=2, rounds=2, max_local_steps=1)


def serialised(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def payload(record: ArrayRecord) -> int:
    return sum(array.numpy().nbytes for array in record.values())


def reply_sizes(config: RunConfig) -> list[dict[str, object]]:
    """One row per round: the groups trained, the reply's arrays and bytes."""
    initial = {k: v.detach().clone() for k, v in federated_state(model_for(config)).items()}
    whole = ArrayRecord(initial)
    rows = []
    for server_round in range(1, config.rounds + 1):
        model = model_for(config)
        load_federated_state(model, initial)
        result = train_locally(model, client_data(config, 0), config, server_round, partition_id=0)
        reply = ArrayRecord(result.weights)  # what client_app.train sends
        groups = model.trained_groups(server_round, config.rounds) if hasattr(model, "trained_groups") else []
        rows.append(
            {
                "round": server_round,
                "trained_groups": list(groups),
                "arrays": len(reply),
                "arrays_whole": len(whole),
                "payload_bytes": payload(reply),
                "serialised_bytes": serialised(reply),
                "serialised_bytes_whole": serialised(whole),
                "share": round(serialised(reply) / serialised(whole), 4),
            }
        )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    ulmfit = reply_sizes(ULMFIT)
    model = model_for(RANDOM_FEATURES)
    first = reply_sizes(RANDOM_FEATURES)[0]
    random_features = {
        "reply_arrays": first["arrays"],
        "reply_serialised_bytes": first["serialised_bytes"],
        "whole_state_dict_serialised_bytes": serialised(ArrayRecord(model.state_dict())),
    }
    classifier_only = next(r for r in ulmfit if r["trained_groups"] == ["classifier"])
    goal = "a classifier-only ULMFiT reply is under 5 % of the whole federated model's serialised bytes"
    out = {
        "settings": {
            "ulmfit": {"dataset": ULMFIT.dataset, "rounds": ULMFIT.rounds, "model_options": "defaults"},
            "random_features": {"dataset": RANDOM_FEATURES.dataset, "model_options": "defaults"},
            "reduced": "one local step per round, one client: sizes do not depend on training",
        },
        "ulmfit_rounds": ulmfit,
        "random_features": random_features,
        "goal": goal,
        "goal_met": bool(classifier_only["share"] < 0.05),
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'round':>5} {'trained groups':<42} {'arrays':>9} {'serialised bytes':>17} {'share':>7}")
    for row in ulmfit:
        arrays = f"{row['arrays']}/{row['arrays_whole']}"
        groups = ",".join(row["trained_groups"])
        print(
            f"{row['round']:>5} {groups:<42} {arrays:>9} {row['serialised_bytes']:>17,} {row['share']:>7.2%}"
        )
    print(f"whole federated ULMFiT: {ulmfit[0]['serialised_bytes_whole']:,} bytes serialised")
    print(
        f"random-features: reply {random_features['reply_serialised_bytes']:,} B (readout), the whole "
        f"state dict would be {random_features['whole_state_dict_serialised_bytes']:,} B"
    )
    print(f"goal: {goal}: {'met' if out['goal_met'] else 'NOT met'} ({out['seconds']} s) -> {RESULTS}")


if __name__ == "__main__":
    main()
