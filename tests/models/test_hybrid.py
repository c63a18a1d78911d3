"""Hybrid SC/PSC network (Wang et al. 2021): its losses by hand, the α schedule, the views, the
class-balanced resample, a federation that learns on long-tailed data, and the audit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fedsim
from models import InputSpec, TrainingSettings, UnsupportedInputError, build_model
from models.hybrid_contrastive import (
    HybridContrastive,
    augment,
    class_balanced_indices,
    contrast_weight,
    prototypical_contrastive_loss,
    supervised_contrastive_loss,
)

SPEC = InputSpec.image((1, 28, 28), 10)


def test_sc_loss_matches_hand_computation_and_skips_an_anchor_without_positives() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1])  # anchor 2 has no positive: skipped
    tau = 0.5
    # anchor 0: positive 1 (z0·z1 = 0), others z0·z2 = 0.6; anchor 1: positive 0, z1·z2 = 0.8.
    anchor0 = -math.log(math.exp(0.0 / tau) / (math.exp(0.0 / tau) + math.exp(0.6 / tau)))
    anchor1 = -math.log(math.exp(0.0 / tau) / (math.exp(0.0 / tau) + math.exp(0.8 / tau)))
    loss = supervised_contrastive_loss(z, labels, tau)
    assert float(loss) == pytest.approx((anchor0 + anchor1) / 2, rel=1e-6)


def test_sc_loss_averages_over_each_anchors_positives() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 0])
    # anchor 0: positives 1 and 2, denominator e^0 + e^0.6 (τ = 1); anchor 2: e^0.6 + e^0.8.
    d0, d1, d2 = 1 + math.exp(0.6), 1 + math.exp(0.8), math.exp(0.6) + math.exp(0.8)
    a0 = -(math.log(1 / d0) + math.log(math.exp(0.6) / d0)) / 2
    a1 = -(math.log(1 / d1) + math.log(math.exp(0.8) / d1)) / 2
    a2 = -(math.log(math.exp(0.6) / d2) + math.log(math.exp(0.8) / d2)) / 2
    loss = supervised_contrastive_loss(z, labels, 1.0)
    assert float(loss) == pytest.approx((a0 + a1 + a2) / 3, rel=1e-6)


def test_sc_loss_without_any_positive_is_zero_and_still_differentiable() -> None:
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss = supervised_contrastive_loss(z, torch.tensor([0, 1, 2]), 0.1)
    loss.backward()
    assert float(loss) == 0.0 and z.grad is not None and float(z.grad.abs().sum()) == 0.0


def test_psc_loss_matches_hand_computation_with_normalised_prototypes() -> None:
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    prototypes = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # used normalised: (1, 0) and (0, 1)
    labels = torch.tensor([0, 1])
    # z0: similarities (1, 0), class 0; z1: (0.6, 0.8), class 1 (τ = 1).
    first = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.0)))
    second = -math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))
    loss = prototypical_contrastive_loss(z, labels, prototypes, 1.0)
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)
    halved = prototypical_contrastive_loss(z, labels, prototypes, 0.5)
    first_half = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    second_half = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    assert float(halved) == pytest.approx((first_half + second_half) / 2, rel=1e-6)


def test_alpha_decays_parabolically_on_the_global_round_clock() -> None:
    assert [contrast_weight(r, 4) for r in range(1, 5)] == [1 - 1 / 16, 1 - 4 / 16, 1 - 9 / 16, 0.0]
    model = build_model("hybrid-sc", SPEC)
    settings = TrainingSettings(learning_rate=0.1, rounds=10)
    model.configure_optimizer(settings, 3)
    assert model.alpha == pytest.approx(1 - 0.09)
    baseline = build_model("hybrid-sc", SPEC, ce_only=True)
    baseline.configure_optimizer(settings, 1)
    assert baseline.alpha == 0.0


def test_views_differ_from_each_other_and_repeat_under_the_seed() -> None:
    images = torch.rand(6, 1, 28, 28)
    torch.manual_seed(5)
    first, second = augment(images, 2, 0.05), augment(images, 2, 0.05)
    torch.manual_seed(5)
    again = augment(images, 2, 0.05)
    assert first.shape == images.shape and not torch.equal(first, second) and not torch.equal(first, images)
    assert torch.equal(first, again)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_a_view_without_shift_or_noise_is_the_image_or_its_mirror() -> None:
    images = torch.rand(16, 1, 8, 8)
    view = augment(images, 0, 0.0)
    for original, seen in zip(images, view, strict=True):
        assert torch.equal(seen, original) or torch.equal(seen, original.flip(-1))


def test_a_shifted_view_is_a_translated_crop_of_the_zero_padded_image() -> None:
    image = torch.rand(1, 1, 6, 6)
    view = augment(image, 1, 0.0)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    crops = [padded[..., dy : dy + 6, dx : dx + 6] for dy in range(3) for dx in range(3)]
    assert any(torch.equal(view, c) or torch.equal(view, c.flip(-1)) for c in crops)


def test_class_balanced_resample_draws_every_present_class_equally_often() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    torch.manual_seed(0)
    drawn = labels[class_balanced_indices(labels, 20000)]
    assert float((drawn == 1).double().mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name", ["hybrid-sc", "hybrid-psc"])
def test_training_loss_weights_its_branches_by_alpha(name: str) -> None:
    model = build_model(name, SPEC)
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([0, 0, 1, 1, 2, 2, 3, 9])
    model.alpha = 1.0  # contrastive only: the classifier gets no gradient
    model.training_loss(model, x, y).backward()
    assert model.classifier.weight.grad is None or float(model.classifier.weight.grad.abs().sum()) == 0
    assert float(model.projection[0].weight.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)
    model.alpha = 0.0  # CE only: the projection head gets no gradient
    model.training_loss(model, x, y).backward()
    assert model.projection[0].weight.grad is None
    assert float(model.classifier.weight.grad.abs().sum()) > 0
    model.alpha = 0.5
    torch.manual_seed(1)
    mixed = model.training_loss(model, x, y)
    torch.manual_seed(1)
    assert torch.equal(mixed, model.training_loss(model, x, y))


def test_evaluation_uses_the_classifier_branch() -> None:
    model = build_model("hybrid-psc", SPEC)
    x = torch.rand(3, 1, 28, 28)
    logits, embedding = model(x, branches=True)
    assert torch.equal(model(x), logits) and logits.shape == (3, 10)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"width": 0}, "width"),
        ({"proj_dim": 1}, "proj_dim"),
        ({"temperature": 0.0}, "temperature"),
        ({"shift": -1}, "shift"),
        ({"noise": -0.1}, "noise"),
    ],
)
def test_bad_options_are_refused(options: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_model("hybrid-sc", SPEC, **options)


def test_hybrid_takes_images_only() -> None:
    with pytest.raises(UnsupportedInputError):
        build_model("hybrid-sc", InputSpec.features(10, 2))
    assert isinstance(build_model("hybrid-psc", InputSpec.image((1, 8, 8), 10)), HybridContrastive)


def test_audit_prints_a_report_and_runs_inverting_gradients(tmp_path: Path) -> None:
    result = fedsim.audit(
        model="hybrid-sc",
        dataset="digits",
        samples=1,
        attacks="layerwise,inverting-gradients",
        out=tmp_path / "audit",
        model_options="width=4",
    )
    summary = result.summary.set_index("attack")
    assert summary.loc["inverting-gradients", "reconstructed"] == 1  # ran, from the recovered label
    assert summary.loc["layerwise", "declined"] == 1  # branched: no flat layer chain
    assert result.architecture.identifiability is not None  # end-to-end rank of the whole network
    assert (tmp_path / "audit" / "report.json").is_file()


def test_ce_batch_is_class_balanced_over_the_clients_split_during_a_round() -> None:
    model = build_model("hybrid-sc", SPEC)
    labels = torch.tensor([0] * 95 + [1] * 5)
    inputs = labels.float()[:, None, None, None].expand(100, 1, 28, 28).clone()
    loader = DataLoader(TensorDataset(inputs, labels, torch.arange(100)), batch_size=10)
    model.before_local_training(loader, 1)
    batch_x, batch_y = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)  # class 0 only
    torch.manual_seed(0)
    drawn = torch.cat([model.ce_batch(batch_x, batch_y)[1] for _ in range(500)])
    assert float((drawn == 1).double().mean()) == pytest.approx(0.5, abs=0.05)  # absent from the batch
    x, y = model.ce_batch(batch_x, batch_y)
    assert torch.equal(x[:, 0, 0, 0], y.float())  # inputs and labels drawn together
    model.after_local_training(loader, 1)
    assert torch.equal(model.ce_batch(batch_x, batch_y)[1], batch_y)  # without the split: the batch
