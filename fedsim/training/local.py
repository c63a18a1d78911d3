"""What a client does with its data: load its partition, train locally, evaluate.

Every random choice is seeded from (run seed, round, partition id), so a client's update
depends only on those and the global weights: runs repeat exactly and resume exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.config.run_config import RunConfig
from fedsim.data import Dataset
from fedsim.data.clients import ClientData, dataset_for
from models import InputSpec, ZooModel, build_model

# At most this many of the samples a client trained on go back to the auditor as ground truth.
MAX_TRUTH_SAMPLES = 64


@dataclass(frozen=True)
class TrainResult:
    train_loss: float
    num_examples: int
    steps: int
    seconds: float
    seen: torch.Tensor  # indices into the client's x_train, in order of first use (capped)


def model_for(config: RunConfig, data: Dataset | None = None) -> ZooModel:
    """The run's model, freshly initialised from the run seed."""
    data = data or dataset_for(config)
    torch.manual_seed(config.seed)
    return build_model(config.model, InputSpec(data.sample_shape, data.num_classes))


def train_locally(
    model: ZooModel,
    data: ClientData,
    config: RunConfig,
    server_round: int,
    partition_id: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Local SGD for `local_epochs` (at most `max_local_steps` steps when set); FedProx adds
    (μ/2)·‖w − w_global‖² to each step's loss."""
    start = time.perf_counter()
    seed = int(np.random.SeedSequence([config.seed, server_round, partition_id]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # for layers that draw randomness (dropout) inside the step
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    model.train()
    losses: list[float] = []
    seen: list[torch.Tensor] = []
    count = len(data.y_train)
    step_limit = config.max_local_steps or None
    for _ in range(config.local_epochs):
        order = torch.randperm(count, generator=generator)
        for batch in order.split(config.batch_size):
            if step_limit is not None and len(losses) >= step_limit:
                break
            if len(seen) < MAX_TRUTH_SAMPLES:
                seen.append(batch)
            proximal = None
            if proximal_mu > 0:
                proximal = (
                    0.5
                    * proximal_mu
                    * sum(
                        ((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True)
                    )
                )
            losses.append(model.training_step(data.x_train[batch], data.y_train[batch], optimizer, proximal))
    trained = min(count, len(losses) * config.batch_size)
    return TrainResult(
        float(np.mean(losses)), trained, len(losses), time.perf_counter() - start, _ordered_unique(seen)
    )


@torch.no_grad()
def evaluate(
    model: ZooModel, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on a labelled set."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        outputs = model(x)
        total_loss += float(model.loss(outputs, y)) * len(y)
        correct += int((model.predict(outputs) == _prediction_targets(model, y)).sum())
    return total_loss / len(targets), correct / len(targets)


def _prediction_targets(model: ZooModel, targets: torch.Tensor) -> torch.Tensor:
    # A single-logit (logistic) head predicts label parity, as its loss is trained on it.
    return targets % 2 if getattr(model, "head", "ce") == "logistic" else targets


def _ordered_unique(batches: list[torch.Tensor]) -> torch.Tensor:
    """Sample indices in order of first use, at most MAX_TRUTH_SAMPLES of them."""
    order: dict[int, None] = {}
    for batch in batches:
        order.update(dict.fromkeys(batch.tolist()))
    return torch.tensor(list(order)[:MAX_TRUTH_SAMPLES], dtype=torch.long)
