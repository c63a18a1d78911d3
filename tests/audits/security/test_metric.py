"""The rank-based security metric: it must see what counting misses (CNN6-d's 280-dim deficit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.base import AttackError
from attacks.layerwise.network_plan import plan_network
from audits.security.metric import SecurityReport, copa_score, ra_counts, security_report
from models import InputSpec, build_model
from models.classifiers import SequentialClassifier

SPEC = InputSpec((3, 32, 32), 10)
SHAPE = (3, 32, 32)
CNN6_UNKNOWNS = [3888, 4332, 4356, 4356, 4356, 3136, 3200]


def seeded(name: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, SPEC, **options)


@pytest.fixture(scope="module")
def cnn6_report() -> SecurityReport:
    return security_report(seeded("cnn6"), SHAPE, seed=0)


@pytest.fixture(scope="module")
def cnn6_d_report() -> SecurityReport:
    return security_report(seeded("cnn6-d"), SHAPE, seed=0)


def test_cnn6_is_full_rank_everywhere(cnn6_report: SecurityReport) -> None:
    assert [r.unknowns for r in cnn6_report.layers] == CNN6_UNKNOWNS
    assert [r.deficit for r in cnn6_report.layers] == [0] * 7
    assert all(r.rank == r.unknowns for r in cnn6_report.layers)
    assert cnn6_report.score == 0 and cnn6_report.invertible
    assert cnn6_report.ra_index == -972
    assert cnn6_report.seconds < 60.0


def test_cnn6_d_second_conv_is_deficient_by_280(cnn6_d_report: SecurityReport) -> None:
    second = cnn6_d_report.layers[1]
    assert (second.kind, second.unknowns, second.rank, second.deficit) == ("Conv2d", 4332, 4052, 280)
    assert second.equations == 4644  # more equations than unknowns, yet deficient
    assert [r.deficit for r in cnn6_d_report.layers] == [0, 280, 0, 0, 0, 0, 0]
    assert cnn6_d_report.deficient_layers == [1] and not cnn6_d_report.invertible
    assert cnn6_d_report.score == round(280 * 5 / 6)
    assert cnn6_d_report.ra_index == -708  # counting alone predicts "attackable"


def test_ra_counts_match_the_e2egi_reference_for_the_logistic_cnn6() -> None:
    plan = plan_network(seeded("cnn6", head="logistic"), SHAPE)
    assert ra_counts(list(plan.layers)) == [-972, -3732, -12060, -12060, -19816, -75724, -1997]


def test_report_renders(cnn6_d_report: SecurityReport) -> None:
    data = cnn6_d_report.to_dict()
    assert data["score"] == cnn6_d_report.score and data["tolerance"] == cnn6_d_report.tolerance
    assert data["layers"][1]["deficit"] == 280 and data["input_shape"] == list(SHAPE)
    table = cnn6_d_report.to_table()
    assert "4052" in table and "280" in table and "rtol" in table
    frame = cnn6_d_report.to_frame()
    assert list(frame["deficit"]) == [0, 280, 0, 0, 0, 0, 0]


def test_observed_k_is_used() -> None:
    """With k = 0 only the weight constraints remain: deficit = unknowns - rank(W) = 3468 - 2916."""
    report = security_report(seeded("cnn6"), SHAPE, ks={1: np.zeros((36, 9, 9))})
    assert report.layers[1].deficit == 3468 - 2916
    assert report.layers[0].deficit == 0


def test_small_models() -> None:
    mlp = security_report(seeded("mlp"), SHAPE)
    assert [r.deficit for r in mlp.layers] == [0, 0, 0] and mlp.score == 0
    lenet = security_report(seeded("lenet"), SHAPE)  # sigmoid LeNet is invertible layer-wise
    assert [r.deficit for r in lenet.layers] == [0, 0, 0, 0]


def test_copa_score_weights_layers_near_the_input_most() -> None:
    assert copa_score([0, 280, 0, 0, 0, 0, 0]) == 233
    assert copa_score([10, 0, 0]) == 10 and copa_score([0, 10, 0]) == 5 and copa_score([0, 0, 10]) == 0
    assert copa_score([5]) == 0


def test_max_pooling_is_named_as_an_upper_bound() -> None:
    """The server does not know the max-pool winners: the row assumes them and says so."""
    layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    report = security_report(SequentialClassifier(layers, SPEC), SHAPE)
    assert report.layers[0].upper_bound and report.upper_bound and report.complete
    assert "MaxPool2d: winners assumed known (upper bound on leakage)" in report.layers[0].treatment
    assert "upper bound" in report.to_table()


def test_a_network_without_linear_head_raises() -> None:
    layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(AttackError, match="Linear head"):
        security_report(SequentialClassifier(layers, SPEC), SHAPE)
