"""Linear regions: the estimators against exact counts, the bounds against the measurements."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from audits.security.linear_regions import (
    NOT_APPLICABLE,
    PRODUCT,
    SERRA,
    PatternProbe,
    RegionSettings,
    first_group_crossings,
    line_crossings,
    linear_regions,
    plane_regions,
    product_bound,
    product_log10,
    regions_over_rounds,
    serra_bound,
    serra_log10,
    unique_patterns,
)
from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError
from fedsim.run_regions import run_linear_regions
from fedsim.store.run_store import RunStore
from fedsim.training.local import model_for
from models import InputSpec, build_model

DIGITS = InputSpec((1, 8, 8), 10)
BOX = 2.0  # the tiny net's regions are counted in [-BOX, BOX]^2


def tiny_net(seed: int = 3) -> nn.Sequential:
    """2 -> 4 -> 3 -> 2 ReLU net: few enough regions to enumerate exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def exact_region_count(net: nn.Sequential, box: float) -> int:
    """Regions of positive area in the box, by the hyperplane arrangement: for every pattern
    (s1, s2), the polytope where the layer-1 signs are s1 and the layer-2 pre-activations (affine
    once s1 is fixed) have signs s2; an LP maximises the margin t, and the region exists iff t > 0."""
    w1, b1 = net[0].weight.double().detach().numpy(), net[0].bias.double().detach().numpy()
    w2, b2 = net[2].weight.double().detach().numpy(), net[2].bias.double().detach().numpy()
    count = 0
    for s1 in itertools.product((0, 1), repeat=4):
        d1 = np.diag(s1)
        a2, c2 = w2 @ d1 @ w1, w2 @ d1 @ b1 + b2
        for s2 in itertools.product((0, 1), repeat=3):
            rows = np.vstack([w1, a2])
            offsets = np.concatenate([b1, c2])
            signs = np.array([2 * s - 1 for s in (*s1, *s2)], dtype=float)
            # maximise t subject to sign_i (row_i x + offset_i) >= t, |x| <= box, t <= 1
            a_ub = np.hstack([-signs[:, None] * rows, np.ones((len(rows), 1))])
            b_ub = signs * offsets
            res = linprog(
                c=[0, 0, -1],
                A_ub=a_ub,
                b_ub=b_ub,
                bounds=[(-box, box), (-box, box), (None, 1)],
                method="highs",
            )
            if res.status == 0 and -res.fun > 1e-7:
                count += 1
    return count


def box_corners(box: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor([-box, -box]), torch.tensor([box, -box]), torch.tensor([-box, box])


def test_plane_estimator_matches_exact_enumeration_of_a_tiny_relu_net() -> None:
    net = tiny_net()
    exact = exact_region_count(net, BOX)
    probe = PatternProbe(net)
    # Brute force: unique patterns on a much finer grid agree with the arrangement.
    fine = torch.linspace(-BOX, BOX, 1201)
    brute = unique_patterns(probe, torch.cartesian_prod(fine, fine))
    assert brute == exact
    assert exact >= 8  # a non-trivial arrangement
    assert plane_regions(probe, *box_corners(BOX), grid=400) == exact
    # A patch at p0: half the span on each side is the box's lower-left quarter.
    quarter = torch.linspace(-BOX, 0, 601)
    assert plane_regions(probe, *box_corners(BOX), grid=200, extent=0.5) == unique_patterns(
        probe, torch.cartesian_prod(quarter, quarter)
    )
    # A coarse grid misses regions, and the comparison sees it.
    assert plane_regions(probe, *box_corners(BOX), grid=4) < exact
    # The bound holds (Serra's, at d = 2 = the input dimension).
    report = linear_regions(net, torch.stack(box_corners(BOX)), RegionSettings(plane_grid=400, lines=0))
    assert report.plane_regions == [exact]
    assert report.bound is not None and report.bound.name == SERRA
    assert report.bound.plane == serra_bound([4, 3], 2) == 77 >= exact
    assert report.bound.log10_input == pytest.approx(math.log10(77))


def test_line_estimator_counts_the_exact_crossings_of_a_one_hidden_layer_net() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3))
    generator = torch.Generator().manual_seed(1)
    start, end = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    w, b = net[0].weight.double().detach(), net[0].bias.double().detach()
    # Unit i's breakpoint solves w_i (start + t (end - start)) + b_i = 0.
    roots = -(w @ start.double() + b) / (w @ (end - start).double())
    analytic = int(((roots > 0) & (roots < 1)).sum())
    assert analytic >= 10
    probe = PatternProbe(net)
    count = line_crossings(probe, start, end, points=64, refine_depth=14)
    assert (count.crossings, count.unresolved) == (analytic, 0)
    assert first_group_crossings(probe, start, end) == analytic
    # With neither refinement nor budget, only the changed intervals are counted (one each):
    # too few, and the comparison sees it.
    coarse = line_crossings(probe, start, end, points=4, refine_depth=0)
    assert coarse.crossings < analytic
    # Out of budget, an interval counts its changed units: exact for one hidden layer, where
    # every unit crosses at most once.
    assert line_crossings(probe, start, end, points=4, max_evaluations=0).crossings == analytic
    report = linear_regions(net, torch.stack([start, end]), RegionSettings(planes=0))
    assert report.line_regions == [analytic + 1] and report.sampling_missed == 0
    coarse = linear_regions(net, torch.stack([start, end]), RegionSettings(line_points=3, refine_depth=0))
    assert coarse.sampling_missed == 1  # flagged against the exact first-layer count


def test_bisection_finds_the_regions_a_deep_net_enters_and_leaves_between_samples() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    generator = torch.Generator().manual_seed(3)
    start, end = torch.randn(4, generator=generator) * 3, torch.randn(4, generator=generator) * 3
    probe = PatternProbe(net)
    dense = line_crossings(probe, start, end, points=20000, refine_depth=0).crossings
    refined = line_crossings(probe, start, end, points=2, refine_depth=16, max_evaluations=100_000)
    unrefined = line_crossings(probe, start, end, points=2, refine_depth=16, max_evaluations=0)
    assert refined.unresolved == 0 and unrefined.unresolved > 0
    assert refined.crossings == dense  # bisection from the two ends finds what 20,000 samples see
    assert unrefined.crossings < dense  # changed units alone miss units that flip back


def test_bounds_hold_for_measured_counts_and_serra_is_tighter_at_a_bottleneck() -> None:
    # Width-1 bottleneck in the plane: the first unit halves it, the second layer sees a line on
    # the active side (at most 1 + 5 pieces) and a constant on the other: 7 in all.
    assert serra_bound([1, 5], 2) == 7 < product_bound([1, 5], 2) == 2 * 16
    assert serra_bound([6], 3) == product_bound([6], 3) == 1 + 6 + 15 + 20
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    data = torch.randn(6, 3, generator=torch.Generator().manual_seed(2)) * 3
    report = linear_regions(net, data, RegionSettings(lines=6, planes=3, plane_grid=96))
    assert report.bound is not None
    assert max(report.plane_regions) <= report.bound.plane
    assert max(report.line_regions) <= report.bound.line
    assert min(report.plane_regions) > 1 and min(report.line_regions) > 1


def test_a_net_without_piecewise_linear_activation_is_not_applicable() -> None:
    torch.manual_seed(0)
    data = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for model in (build_model("lenet", DIGITS), nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Sigmoid())):
        report = linear_regions(model, data)
        assert not report.applicable and report.note == NOT_APPLICABLE
        assert report.line() == f"linear regions: {NOT_APPLICABLE}"
        assert report.line_regions == [] and report.bound is None


def test_smooth_ops_on_the_input_path_are_named_and_get_no_bound() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh())
    report = linear_regions(net, torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    assert report.applicable and not report.piecewise_linear
    assert report.smooth_ops == ("tanh",) and report.bound is None and "not piecewise linear" in report.note


def test_zoo_ops_are_found_whatever_the_structure() -> None:
    torch.manual_seed(0)
    data = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = RegionSettings(lines=1, planes=1, plane_grid=8, line_points=16)
    # resnet-mini applies F.relu inside its residual blocks: stem 16x8x8, two 16x8x8, two 32x4x4.
    resnet = linear_regions(build_model("resnet-mini", DIGITS), data, settings)
    assert resnet.ops == {"relu": 1024 + 2 * 1024 + 2 * 512}
    assert resnet.bound is not None and resnet.bound.name == PRODUCT  # not a plain chain
    pooled = linear_regions(build_model("convnet-maxpool", DIGITS), data, settings)
    assert pooled.ops == {"relu": 16 * 64 + 32 * 16, "max_pool2d": 16 * 16 + 32 * 4}
    # The mlp's LeakyReLU is piecewise linear; its bound is the product (Serra's needs ReLU).
    mlp = linear_regions(build_model("mlp", DIGITS), data, settings)
    assert mlp.ops == {"leaky_relu": 256} and mlp.bound.name == PRODUCT
    assert mlp.bound.line == 129**2
    # DAM's gates are functions of parameters only: no codes of their own.
    dam = linear_regions(build_model("dam-mlp", DIGITS), data, settings)
    assert set(dam.ops) == {"relu"} and dam.piecewise_linear
    json.dumps(pooled.to_dict())


def test_counts_are_seeded_and_follow_the_weights_over_rounds() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", DIGITS)
    data = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = RegionSettings(lines=3, planes=1, plane_grid=16)
    first, again = linear_regions(model, data, settings), linear_regions(model, data, settings)
    assert first.line_regions == again.line_regions and first.plane_regions == again.plane_regions
    zeroed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    rows = regions_over_rounds(
        build_model("mlp", DIGITS), [(0, model.state_dict()), (1, zeroed)], data, settings
    )
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["line_regions"] == first.line_regions
    # All-zero weights: every pre-activation is 0 everywhere, a single region.
    assert rows[1]["line_regions"] == [1, 1, 1] and rows[1]["plane_regions"] == [1]


@pytest.mark.parametrize(
    "bad", [{"lines": -1}, {"line_points": 1}, {"plane_grid": 1}, {"planes": 1.5}, {"plane_extent": 0}]
)
def test_bad_settings_raise_one_line(bad: dict) -> None:
    with pytest.raises(ValueError, match=r"must be an? (integer|number)"):
        RegionSettings(**bad)


def test_a_run_directory_is_read_round_by_round(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"model": "mlp", "dataset": "digits", "name": "r", "rounds": 1})
    store = RunStore.create(tmp_path, config, ("accuracy",))
    model = model_for(config)
    zeroed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    store.save_checkpoint(0, model.state_dict(), {})
    store.save_checkpoint(1, zeroed, {})
    store.append_rows([{"round": 1, "stage": "server", "eval_accuracy": 0.5}])
    settings = RegionSettings(lines=2, planes=1, plane_grid=12, line_points=32)
    rows = run_linear_regions(store.path, samples=3, settings=settings)
    assert [(r["round"], r["accuracy"]) for r in rows] == [(0, None), (1, 0.5)]
    assert rows[0]["mean_line_regions"] > 1 and rows[1]["line_regions"] == [1, 1]
    with pytest.raises(UserInputError, match="samples must be at least 2"):
        run_linear_regions(store.path, samples=1)


@pytest.mark.parametrize("seed", range(6))
def test_log_space_bounds_match_the_exact_integers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 40, size=int(rng.integers(1, 5)))]
    dim = int(rng.integers(1, 50))
    assert serra_log10(widths, dim) == pytest.approx(math.log10(serra_bound(widths, dim)), rel=1e-9)
    assert product_log10(widths, dim) == pytest.approx(math.log10(product_bound(widths, dim)), rel=1e-9)
    assert serra_bound(widths, dim) <= product_bound(widths, dim)
