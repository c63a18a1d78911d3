"""What a client does with its data: train the global model locally, evaluate it.

Local training is one seam, the same for every model family and every client-side defence:

    model -> model.configure_optimizer(settings, round) -> DataLoader over the client's train split
          -> model.before_local_training(data_loader, round)
          -> client transformations wrap (module, optimizer, data_loader)   (fedsim.training.transforms)
          -> loop: loss = model.training_loss(module, x, model.sample_targets(x, y)) [+ FedProx], step
          -> unwrap -> model.after_local_training(data_loader, round)
          -> update-level defences transform w_local − w_global, in list order (clip, topk, ...),
             over the entries the client sends (`model.sent_names(round)`)
          -> TrainResult (the sent weights, metrics, extra records, samples seen)

A family not trained by gradients (`model.trained_by_gradients` False, e.g. LEDL) replaces the
optimiser, the transformations and the loop with its own `model.local_update(data_loader, ...)`.

Every random choice is seeded from (run seed, round, partition id), so a client's update
depends only on those and the global weights: runs repeat exactly and resume exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from fedsim.config.run_config import RunConfig
from fedsim.data import Dataset
from fedsim.data.clients import ClientData, dataset_for
from fedsim.training.run_model import build_run_model
from fedsim.training.transforms import (
    PrivacySpend,
    build_transformations,
    finish_all,
    unwrap_all,
    wrap_all,
)
from models import TrainingSettings, ZooModel
from models.base import ExtraRecord, sent_names_of

# At most this many of the samples a client trained on go back to the auditor as ground truth.
MAX_TRUTH_SAMPLES = 64


@dataclass(frozen=True)
class TrainResult:
    """What one client's local round produced, ready to report."""

    train_loss: float  # mean of the steps' model losses (without the proximal term)
    num_examples: int  # distinct samples trained on (Poisson sampling: their expected number)
    steps: int
    seconds: float
    seen: torch.Tensor  # indices into the client's x_train, in order of first use (capped)
    weights: dict[str, torch.Tensor]  # the sent entries of the state after training (and its round hook)
    extra_records: dict[str, ExtraRecord]  # the family's payloads beside the weights
    defences: tuple[str, ...] = ()  # each client transformation's label, in wrap order
    privacy: tuple[PrivacySpend, ...] = ()  # what the accounted ones spent this round


@dataclass(frozen=True)
class Evaluation:
    """Mean loss and each of the model's metrics, averaged over samples."""

    loss: float
    metrics: dict[str, float]
    num_examples: int


def training_settings(config: RunConfig) -> TrainingSettings:
    """The run's training knobs as the model sees them (models do not know RunConfig)."""
    return TrainingSettings(
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        rounds=config.rounds,
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        max_local_steps=config.max_local_steps,
    )


def model_for(config: RunConfig, data: Dataset | None = None) -> ZooModel:
    """The run's model for the run's data (its input spec), freshly initialised from the run seed,
    bound to the run's training settings (what its round-scheduled `sent_names` reads)."""
    data = data or dataset_for(config)
    torch.manual_seed(config.seed)
    model = build_run_model(config.model, data.spec, config.model_options)
    model.run_settings = training_settings(config)
    return model


def metric_names(config: RunConfig) -> tuple[str, ...]:
    """The evaluation metrics the run's model reports (the run store's eval_ columns)."""
    return tuple(model_for(config).metric_names)


def round_seed(config: RunConfig, server_round: int, partition_id: int) -> int:
    return int(np.random.SeedSequence([config.seed, server_round, partition_id]).generate_state(1)[0])


def update_noise_generator(seed: int) -> torch.Generator:
    """The stream update-level defences draw noise from: seeded by the round seed, apart from the
    global generator the loop seeds with it (same draws there would correlate noise and dropout)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))


class EpochShuffle(Sampler[int]):
    """A fresh permutation per epoch, one `randperm` draw each (torch's RandomSampler draws an
    extra one at the end of every epoch), so batches are a function of the seed alone."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.count = count
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.count, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.count


def client_loader(data: ClientData, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches of (inputs, labels, sample indices) of the client's train split; the
    indices say which samples were seen, for the auditor's ground truth."""
    samples = TensorDataset(data.x_train, data.y_train, torch.arange(len(data.y_train)))
    order = EpochShuffle(len(samples), torch.Generator().manual_seed(seed))
    # The loader draws a worker seed from its own generator each epoch; a separate one keeps
    # that draw out of the shuffle and out of the global RNG that dropout layers use.
    loader_rng = torch.Generator().manual_seed(seed)
    return DataLoader(samples, batch_size=batch_size, sampler=order, generator=loader_rng)


class ProximalTerm:
    """FedProx (Li et al. 2020, eq. 2): (μ/2)·‖w − w_global‖², w_global frozen at the round's start."""

    def __init__(self, model: ZooModel, mu: float) -> None:
        self.mu = mu
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def __call__(self, model: ZooModel) -> torch.Tensor:
        pairs = zip(model.parameters(), self.anchor, strict=True)
        return 0.5 * self.mu * sum(((p - g) ** 2).sum() for p, g in pairs)  # type: ignore[return-value]


def train_locally(
    model: ZooModel,
    data: ClientData,
    config: RunConfig,
    server_round: int,
    partition_id: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Local training for `local_epochs` (at most `max_local_steps` steps when set) through the
    run's client transformations; FedProx's μ comes from the caller (the strategy's message)."""
    start = time.perf_counter()
    seed = round_seed(config, server_round, partition_id)
    torch.manual_seed(seed)  # for layers that draw randomness (dropout) inside the step
    model.run_settings = training_settings(config)
    if not model.trained_by_gradients:
        return _solve_locally(model, data, config, server_round, seed, start)
    sent = sent_names_of(model, server_round)
    # What the update is measured against: the round's starting values of the sent entries only,
    # so the defences clip, sparsify and noise exactly what leaves the node.
    global_state = _entries(model, sent, clone=True)
    optimizer = model.configure_optimizer(training_settings(config), server_round)
    loader = client_loader(data, config.batch_size, seed)
    model.before_local_training(loader, server_round)
    transformations = build_transformations(config)
    module, optimizer, train_loader = wrap_all(transformations, model, optimizer, loader)
    proximal = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None
    module.train()
    losses: list[float] = []
    seen: list[torch.Tensor] = []
    distinct: set[int] = set()
    steps = 0
    step_limit = config.max_local_steps or None
    for _ in range(config.local_epochs):
        for inputs, labels, indices in train_loader:
            if step_limit is not None and steps >= step_limit:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = model.training_loss(module, inputs, model.sample_targets(inputs, labels))
            total = loss if proximal is None else loss + proximal(model)
            total.backward()
            optimizer.step()
            steps += 1
            # A Poisson-sampled batch (DP-SGD) may be empty: its step adds noise only, and its
            # loss, a mean over nothing, is no measurement.
            if len(labels):
                losses.append(float(loss.detach()))
                distinct.update(indices.tolist())
                if len(seen) < MAX_TRUTH_SAMPLES:
                    seen.append(indices)
    unwrap_all(transformations, module, model)
    model.after_local_training(loader, server_round)
    finish_all(transformations, model, global_state, update_noise_generator(seed))
    return TrainResult(
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        num_examples=_examples_trained(train_loader, len(distinct), steps, len(data.y_train)),
        steps=steps,
        seconds=time.perf_counter() - start,
        seen=_ordered_unique(seen),
        weights=_entries(model, sent),
        extra_records=model.extra_records(),
        defences=tuple(t.label for t in transformations),
        privacy=tuple(spend for t in transformations if (spend := t.privacy_spent()) is not None),
    )


def _solve_locally(
    model: ZooModel, data: ClientData, config: RunConfig, server_round: int, seed: int, start: float
) -> TrainResult:
    """The local round of a family not trained by gradients (`ZooModel.local_update`): no
    optimiser, no client transformations (the plan refuses them for such a family), every sample
    used once; what it computed leaves through its extra records."""
    if config.transformation_names():
        raise ValueError(f"{model.name} is not trained by gradients; client defences cannot wrap it")
    loader = client_loader(data, config.batch_size, seed)
    loss = model.local_update(loader, training_settings(config), server_round)
    size = len(data.y_train)
    return TrainResult(
        train_loss=float(loss),
        num_examples=size,
        steps=0,
        seconds=time.perf_counter() - start,
        seen=torch.arange(min(size, MAX_TRUTH_SAMPLES)),
        weights=_entries(model, sent_names_of(model, server_round)),
        extra_records=model.extra_records(),
    )


def _entries(model: ZooModel, names: tuple[str, ...], clone: bool = False) -> dict[str, torch.Tensor]:
    """The named state-dict entries, in that order (copies when `clone`)."""
    state = model.state_dict()
    unknown = [name for name in names if name not in state]
    if unknown:
        raise ValueError(f"{model.name}.sent_names names {unknown[:3]}, not state-dict entries")
    return {name: state[name].detach().clone() if clone else state[name] for name in names}


def _examples_trained(train_loader: DataLoader, distinct: int, steps: int, size: int) -> int:
    """The samples a client reports having trained on: the distinct ones it drew, or, when its
    batches were Poisson-sampled (Opacus's loader, which has a `sample_rate`), their expected
    number N·(1 − (1 − q)^steps), at least one. The realised count would tell the server which
    sampling outcome occurred, which DP-SGD's accounting assumes hidden, and is often 0 (an
    empty FedSGD batch), which the server must refuse as an aggregation weight."""
    rate = getattr(train_loader, "sample_rate", None)
    if rate is None:
        return distinct
    return max(1, round(size * (1 - (1 - rate) ** steps)))


@torch.no_grad()
def evaluate(
    model: ZooModel, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None
) -> Evaluation:
    """Mean loss and every metric of `model` on a labelled set; per-batch means are weighted
    by what they average over (`model.metric_weight`: the batch size, or e.g. its tokens), so
    the result does not depend on `batch_size`."""
    batch_size = batch_size or model.evaluation_batch_size
    model.eval()
    count = len(labels)
    total_loss = 0.0
    total_weight = 0.0
    totals = dict.fromkeys(model.metric_names, 0.0)
    for start in range(0, count, batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        targets = model.sample_targets(x, y)
        outputs = model(x)
        weight = model.metric_weight(targets)
        total_weight += weight
        total_loss += float(model.loss(outputs, targets)) * weight
        batch = model.metrics(outputs, targets)
        if set(batch) != set(totals):
            raise ValueError(
                f"{model.name}.metrics returned {sorted(batch)} but declares metric_names {sorted(totals)}"
            )
        for name, value in batch.items():
            totals[name] += value * weight
    total_weight = total_weight or 1.0  # nothing to average (e.g. only padding): zeros
    metrics = {name: value / total_weight for name, value in totals.items()}
    return Evaluation(total_loss / total_weight, metrics, count)


def _ordered_unique(batches: list[torch.Tensor]) -> torch.Tensor:
    """Sample indices in order of first use, at most MAX_TRUTH_SAMPLES of them."""
    order: dict[int, None] = {}
    for batch in batches:
        order.update(dict.fromkeys(batch.tolist()))
    return torch.tensor(list(order)[:MAX_TRUTH_SAMPLES], dtype=torch.long)
