"""DAM pruning (Bu et al. 2021): the gate, its penalty and cold start, the compact rebuild, the
audit of a gated network, and a federation that prunes while it learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedsim
from attacks.layerwise.layer_ops import op_kind
from audits.architecture.standalone import audit_model
from fedsim.data.registry import load_dataset
from fedsim.training.local import evaluate
from models import InputSpec, TrainingSettings, build_model, parse_model_options
from models.dam import DAM_K, DamGate, DamNetwork, compact

DIGITS = InputSpec((1, 8, 8), 10)


def _dam(name: str = "dam-mlp", spec: InputSpec = DIGITS, **options: object) -> DamNetwork:
    torch.manual_seed(0)
    model = build_model(name, spec, **options)
    assert isinstance(model, DamNetwork)
    return model


def test_gate_is_relu_tanh_of_alpha_squared_mu_plus_beta() -> None:
    gate = DamGate(10, alpha=1.5)
    gate.beta.data.fill_(-2.2)
    expected = [max(0.0, math.tanh(1.5**2 * (DAM_K * i / 10 - 2.2))) for i in range(10)]
    assert torch.allclose(gate.gate(), torch.tensor(expected), atol=1e-6)
    # μ_i + β > 0 exactly for i > 4.4: the lowest-index units close first (a nested mask)
    assert gate.alive().tolist() == [False] * 5 + [True] * 5 and gate.width() == 5
    vectors, images = torch.rand(3, 10), torch.rand(3, 10, 4, 4)
    assert torch.allclose(gate(vectors), vectors * torch.tensor(expected))
    assert torch.allclose(gate(images), images * torch.tensor(expected).view(1, 10, 1, 1))
    assert DamGate(10).beta.item() == 1.0 and DamGate(10).width() == 10, "β starts at 1: every unit open"


@pytest.mark.parametrize(
    ("beta", "penalty", "grad"), [(-2.0, -2.0, 1.0), (-7.0, -DAM_K, 0.0), (0.5, 0.5, 1.0)]
)
def test_penalty_is_beta_clamped_at_minus_k(beta: float, penalty: float, grad: float) -> None:
    gate = DamGate(8)
    gate.beta.data.fill_(beta)
    value = gate.penalty()
    value.backward()
    assert value.item() == pytest.approx(penalty) and gate.beta.grad.item() == grad
    if beta <= -DAM_K:
        assert gate.width() == 0, "at β ≤ −k the whole layer is closed"


def test_training_loss_adds_lambda_times_mean_beta() -> None:
    model = _dam(lam=0.3)
    for gate, beta in zip(model.gates(), (-1.0, -9.0), strict=True):
        gate.beta.data.fill_(beta)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    expected = model.loss(model(x), y) + 0.3 * (-1.0 - DAM_K) / 2
    assert model.training_loss(model, x, y).item() == pytest.approx(expected.item(), abs=1e-6)


def _steps(model: DamNetwork, server_round: int, steps: int = 5) -> None:
    optimizer = model.configure_optimizer(TrainingSettings(0.1, momentum=0.9, rounds=4), server_round)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        model.training_loss(model, x, y).backward()
        optimizer.step()


def test_cold_start_freezes_beta_for_its_rounds_only() -> None:
    model = _dam(lam=1.0, cold_rounds=2)
    weight = model.layers[1].weight.detach().clone()
    _steps(model, server_round=2)
    assert [g.beta.item() for g in model.gates()] == [1.0, 1.0], "β moved during cold start"
    assert not torch.equal(model.layers[1].weight, weight), "the rest trains during cold start"
    _steps(model, server_round=3)
    assert all(g.beta.item() < 1.0 for g in model.gates()), "the penalty pulls β down after cold start"


@pytest.mark.parametrize(
    ("name", "spec", "betas"),
    [
        ("dam-mlp", DIGITS, (-1.7, -3.1)),
        ("dam-mlp", DIGITS, (-DAM_K, -0.4)),  # a closed layer: the head sees the next bias only
        ("dam-cnn", InputSpec((1, 28, 28), 10), (-2.0, -0.9, -3.3)),
        ("dam-cnn", InputSpec((3, 32, 32), 10), (0.3, -4.2, -1.1)),
    ],
)
def test_compact_rebuild_removes_dead_units_and_computes_the_same(
    name: str, spec: InputSpec, betas: tuple[float, ...]
) -> None:
    model = _dam(name, spec)
    for gate, beta in zip(model.gates(), betas, strict=True):
        gate.beta.data.fill_(beta)
    small = compact(model)
    assert not any(isinstance(m, DamGate) for m in small.modules())
    weighted = [m for m in small.layers if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    kept = [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features for m in weighted[:-1]]
    assert kept == model.widths() and sum(kept) < sum(g.units for g in model.gates())
    x = torch.rand(8, *spec.shape)
    with torch.no_grad():
        dense, pruned = model(x), small(x)
    assert torch.allclose(dense, pruned, atol=1e-5), float((dense - pruned).abs().max())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_widths_are_evaluation_metrics() -> None:
    model = _dam(widths="32-16")
    model.gates()[1].beta.data.fill_(-2.5)  # μ_i + β > 0 for i > 8
    assert model.metric_names == ("accuracy", "width_1", "width_2")
    data = load_dataset("digits")
    result = evaluate(
        model, torch.as_tensor(data.x_test[:100]), torch.as_tensor(data.y_test[:100]), batch_size=30
    )
    assert result.metrics["width_1"] == 32 and result.metrics["width_2"] == 7


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("widths=64-x", "widths='64-x' is not positive whole numbers joined by '-'"),
        ("widths=0", "is not positive whole numbers"),
        ("lam=-1", "lam must be >= 0"),
        ("alpha=0", "alpha must not be 0"),
        ("cold_rounds=-1", "cold_rounds must be >= 0"),
    ],
)
def test_bad_options_are_refused(options: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("'", "'")):
        build_model("dam-mlp", DIGITS, **parse_model_options("dam-mlp", options))


@pytest.mark.parametrize(
    ("name", "options", "attacks", "kinds"),
    [
        ("dam-mlp", "widths=64-64", "layerwise,inverting-gradients", ["Linear"] * 3),
        ("dam-cnn", "", "layerwise", ["Conv2d", "Conv2d", "Linear", "Linear"]),
    ],
)
def test_audit_treats_the_gate_as_a_known_scale_and_the_attack_recovers_the_input(
    name: str, options: str, attacks: str, kinds: list[str]
) -> None:
    assert op_kind(DamGate(4)) == "affine"
    result = fedsim.audit(model=name, dataset="digits", samples=1, attacks=attacks, model_options=options)
    security = result.security
    assert security is not None and list(security["kind"]) == kinds
    assert result.security_report.score == 0 and not result.security_report.untreated
    summary = result.summary.set_index("attack")
    assert summary.loc["layerwise", "mean_psnr"] >= 60
    assert list(summary.index) == attacks.split(",")
    assert all(not math.isnan(psnr) for psnr in summary["mean_psnr"])


def test_audit_of_a_pruned_network_and_its_compact_rebuild() -> None:
    """Dead units give no equations: the gated network and its rebuild leak the same input."""
    model = _dam(widths="64-64")
    for gate, beta in zip(model.gates(), (-2.5, -3.5), strict=True):
        gate.beta.data.fill_(beta)
    data = load_dataset("digits")
    x, y = data.x_test[:1], data.y_test[:1]
    gated = audit_model(model, x, y, ["layerwise"]).architecture
    rebuilt = audit_model(compact(model), x, y, ["layerwise"]).architecture
    assert "DamGate known per-unit scale" in gated.layerwise.layers[0].treatment
    assert [r.deficit for r in gated.layerwise.layers] == [r.deficit for r in rebuilt.layerwise.layers]
    assert gated.identifiability.deficit == rebuilt.identifiability.deficit == 0
    assert min(gated.attacks[0].psnr, rebuilt.attacks[0].psnr) >= 60
    assert np.isfinite(gated.bound.psnr_ceiling) and np.isfinite(rebuilt.bound.psnr_ceiling)
