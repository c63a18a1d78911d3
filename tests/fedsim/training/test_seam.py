"""The client training seam: model -> optimiser -> DataLoader -> transformations -> loop -> unwrap
-> round hook -> report; and a new model family that needs nothing but its module and a
registry line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.errors import UserInputError
from fedsim.plan.planning import validate_plan
from fedsim.store.plots import plot_metrics
from fedsim.store.run_store import RunStore, metric_columns
from fedsim.training import transforms
from fedsim.training.local import client_loader, evaluate, metric_names, model_for, train_locally
from models import MODELS, InputSpec, ModelEntry, TrainingSettings, ZooModel


# --- a tiny new family, as the README's "Adding a model" describes ------------------------------
class LinearProbe(ZooModel):
    """A random projection and a linear classifier on top: the projection is frozen in round 1
    and then trained at a tenth of the rate, the classifier's rate decays over the run; after
    local training it records its class means of projected features as an extra record."""

    metric_names = ("accuracy", "brier")

    def __init__(self, spec: InputSpec, width: int = 8) -> None:
        super().__init__(spec)
        spec.require("features", model="probe")
        self.projection = nn.Linear(spec.num_features, width)
        self.classifier = nn.Linear(width, spec.num_classes)
        self.class_means = np.zeros((spec.num_classes, width), dtype=np.float32)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.projection(inputs))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(inputs))

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        onehot = F.one_hot(targets, self.spec.num_classes).float()
        brier = float(((outputs.softmax(-1) - onehot) ** 2).sum(-1).mean())
        return {**super().metrics(outputs, targets), "brier": brier}

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        decay = 1 - (server_round - 1) / settings.rounds
        groups: list[dict[str, Any]] = [
            {"params": list(self.classifier.parameters()), "lr": settings.learning_rate * decay}
        ]
        if server_round > 1:
            groups.append({"params": list(self.projection.parameters()), "lr": settings.learning_rate / 10})
        return torch.optim.SGD(groups, lr=settings.learning_rate, momentum=settings.momentum)

    @torch.no_grad()
    def after_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        sums = torch.zeros(self.class_means.shape)
        counts = torch.zeros(self.spec.num_classes)
        for inputs, labels, _ in data_loader:
            sums.index_add_(0, labels, self.embed(inputs))
            counts += torch.bincount(labels, minlength=self.spec.num_classes)
        self.class_means = (sums / counts.clamp(min=1)[:, None]).numpy()
        self.counts = counts.numpy()

    def extra_records(self) -> dict[str, Any]:
        return {"class-means": {"means": self.class_means, "samples": int(self.counts.sum())}}


def probe(spec: InputSpec, width: int = 8) -> LinearProbe:
    return LinearProbe(spec, width)


PROBE_RUN = RunConfig(
    dataset="breast-cancer",
    model="probe",
    num_clients=3,
    rounds=4,
    local_epochs=2,
    batch_size=16,
    learning_rate=1.0,
    momentum=0.0,
)


def test_a_new_family_needs_only_its_module_and_a_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS, "probe", ModelEntry(probe, ("image", "features"), "digits"))
    validate_plan(PROBE_RUN)  # fits the dataset's spec
    assert metric_names(PROBE_RUN) == ("accuracy", "brier")
    model = model_for(PROBE_RUN)
    data = client_data(PROBE_RUN, 0)
    before = evaluate(model, data.x_train, data.y_train)
    projection = model.projection.weight.detach().clone()
    classifier = model.classifier.weight.detach().clone()

    first = train_locally(model, data, PROBE_RUN, server_round=1, partition_id=0)
    assert torch.equal(model.projection.weight, projection), "round 1 must leave the projection frozen"
    assert not torch.equal(model.classifier.weight, classifier)
    extra = first.extra_records["class-means"]
    assert extra["means"].shape == (2, 8) and extra["samples"] == len(data.y_train)
    decoded = wire.decode_extra(wire.encode_extra(extra))
    assert np.array_equal(decoded["means"], extra["means"]) and decoded["samples"] == extra["samples"]

    train_locally(model, data, PROBE_RUN, server_round=2, partition_id=0)
    assert not torch.equal(model.projection.weight, projection), "from round 2 the projection trains"
    after = evaluate(model, data.x_train, data.y_train)
    assert set(after.metrics) == {"accuracy", "brier"}
    assert after.loss < before.loss and after.metrics["brier"] < before.metrics["brier"]
    assert after.metrics["accuracy"] > 0.85


def test_metrics_csv_and_plot_follow_the_models_metrics(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, RunConfig(name="probe"), ("accuracy", "brier"))
    header = metric_columns(("accuracy", "brier"))
    assert header == (
        "round", "partition_id", "stage", "train_loss", "eval_loss",
        "eval_accuracy", "eval_brier", "num_examples", "seconds", "epsilon_central", "epsilon_client_max",
    )  # fmt: skip
    assert store.columns == header
    store.append_rows(
        [
            {"round": r, "stage": "server", "eval_loss": 1 / (r + 1), "eval_accuracy": 0.5, "eval_brier": 0.3}
            for r in (0, 1, 2)
        ]
    )
    with open(store.metrics_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["eval_brier"] for row in rows] == ["0.3"] * 3
    plot_metrics(store.metrics_path, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 10_000


# --- determinism and FedSGD ---------------------------------------------------------------------
def test_fedsgd_is_one_step_on_one_sample() -> None:
    config = RunConfig(num_clients=4, batch_size=1, max_local_steps=1, momentum=0.0, learning_rate=0.1)
    model = model_for(config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = client_data(config, 1)
    result = train_locally(model, data, config, server_round=3, partition_id=1)
    assert (result.steps, result.num_examples, len(result.seen)) == (1, 1, 1)

    # The update is exactly -lr times the gradient on the one sample it reports having seen.
    reference = model_for(config)
    i = int(result.seen[0])
    loss = reference.loss(reference(data.x_train[i : i + 1]), reference.targets(data.y_train[i : i + 1]))
    grads = dict(zip(start, torch.autograd.grad(loss, list(reference.parameters())), strict=True))
    for name, weight in result.weights.items():
        assert torch.allclose(start[name] - weight, 0.1 * grads[name], atol=1e-7), name


def test_batches_are_one_seeded_permutation_per_epoch() -> None:
    data = client_data(RunConfig(num_clients=4), 0)
    loader = client_loader(data, batch_size=32, seed=11)
    generator = torch.Generator().manual_seed(11)
    for _ in range(2):  # each epoch draws exactly one randperm from the seed's generator
        expected = torch.randperm(len(data.y_train), generator=generator)
        batches = list(loader)
        assert torch.equal(torch.cat([indices for _, _, indices in batches]), expected)
        for inputs, labels, indices in batches:  # each batch carries the rows its indices name
            assert torch.equal(inputs, data.x_train[indices]) and torch.equal(labels, data.y_train[indices])


def test_local_training_depends_only_on_seed_round_and_partition() -> None:
    config = RunConfig(num_clients=4, local_epochs=1)

    def run(server_round: int, partition_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        model = model_for(config)
        result = train_locally(model, client_data(config, partition_id), config, server_round, partition_id)
        return result.weights, result.seen.tolist()

    weights, seen = run(2, 1)
    again, seen_again = run(2, 1)
    assert seen == seen_again and all(torch.equal(weights[k], again[k]) for k in weights)
    assert run(3, 1)[1] != seen, "another round shuffles differently"


# --- client transformations ---------------------------------------------------------------------
class _CountingModule(nn.Module):
    def __init__(self, inner: nn.Module, log: CountingTransformation) -> None:
        super().__init__()
        self.inner = inner
        self.log = log

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.log.forwards += 1
        return self.inner(inputs)


class _CountingOptimizer:
    """Delegates to the wrapped optimiser, as Opacus's DPOptimizer does, and counts steps."""

    def __init__(self, inner: torch.optim.Optimizer, log: CountingTransformation) -> None:
        self.inner = inner
        self.log = log

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.log.steps += 1
        self.inner.step()


class CountingTransformation:
    """Wraps module and optimiser (Opacus's make_private shape), counting what the loop does."""

    name = "counting"
    made: ClassVar[list[CountingTransformation]] = []

    def __init__(self, config: RunConfig, unwraps: bool = True) -> None:
        self.forwards = self.steps = 0
        self.batch_size: int | None = None
        self.unwraps = unwraps
        self.unwrapped = self.finished = False
        CountingTransformation.made.append(self)

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader) -> tuple:
        self.batch_size = data_loader.batch_size
        return _CountingModule(module, self), _CountingOptimizer(optimizer, self), data_loader

    label = "counting"

    def privacy_spent(self) -> None:
        return None

    def unwrap(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, _CountingModule)
        self.unwrapped = True
        return module.inner if self.unwraps else module

    def finish(self, model: nn.Module, global_state: dict, generator: torch.Generator) -> None:
        assert self.unwrapped, "the update is finished after unwrapping"
        self.finished = True


def test_configured_transformations_wrap_the_loop_and_are_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        transforms.TRANSFORMATIONS, "counting", transforms.TransformationEntry(CountingTransformation, "", ())
    )
    plain = RunConfig(num_clients=4, local_epochs=1, batch_size=16)
    wrapped = plain.replace(defence="counting")
    validate_plan(wrapped)
    CountingTransformation.made.clear()

    model = model_for(wrapped)
    result = train_locally(model, client_data(wrapped, 0), wrapped, server_round=1, partition_id=0)
    (made,) = CountingTransformation.made
    assert made.forwards == made.steps == result.steps > 1 and made.batch_size == 16
    assert made.unwrapped and made.finished and result.defences == ("counting",) and result.privacy == ()
    assert result.weights.keys() == model.state_dict().keys()  # the model's own names, no "inner."

    reference = train_locally(model_for(plain), client_data(plain, 0), plain, server_round=1, partition_id=0)
    assert all(torch.equal(result.weights[k], reference.weights[k]) for k in reference.weights)


def test_a_transformation_that_does_not_unwrap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    sticky = transforms.TransformationEntry(
        lambda config: CountingTransformation(config, unwraps=False), "", ()
    )
    monkeypatch.setitem(transforms.TRANSFORMATIONS, "sticky", sticky)
    config = RunConfig(num_clients=4, local_epochs=1, defence="sticky")
    with pytest.raises(RuntimeError, match="did not unwrap to the model"):
        train_locally(model_for(config), client_data(config, 0), config, server_round=1, partition_id=0)


def test_unknown_transformations_are_bad_input() -> None:
    with pytest.raises(UserInputError, match="unknown client transformation"):
        validate_plan(RunConfig(num_clients=4, defence="no-such-defence"))
