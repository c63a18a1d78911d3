"""LEDL: the ADMM lasso, the coordinate-descent step, federated == centralised, accuracy, refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attacks.disclosure.statistics import invert_statistics
from audits.architecture.standalone import audit_model
from fedsim.config.run_config import RunConfig
from fedsim.data.registry import load_dataset
from fedsim.errors import UserInputError
from fedsim.plan.gradient_free import check_gradient_free
from fedsim.plan.planning import validate_plan
from models import InputSpec, TrainingSettings, build_model
from models.ledl import STATISTICS, Ledl, admm_codes, coordinate_descent, dictionary_step

SETTINGS = TrainingSettings(learning_rate=0.1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def fresh(spec: InputSpec, seed: int = 0, **options) -> Ledl:
    torch.manual_seed(seed)
    model = build_model("ledl", spec, **options)
    assert isinstance(model, Ledl)
    return model


def test_admm_satisfies_the_lasso_kkt_conditions() -> None:
    # ½ sᵀGs − rᵀs + α‖s‖₁: optimal iff (Gs − r)_k = −α·sign(s_k) where s_k ≠ 0, |(Gs − r)_k| ≤ α else.
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    targets = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    gram, corr, alpha = basis.T @ basis, basis.T @ targets, 0.7
    codes = admm_codes(gram, corr, alpha, rho=1.0, iterations=3000)
    residual = gram @ codes - corr
    active = codes != 0
    assert active.any() and (~active).any(), "the test needs both active and inactive coefficients"
    assert torch.allclose(residual[active], -alpha * torch.sign(codes[active]), atol=1e-6)
    assert (residual[~active].abs() <= alpha + 1e-6).all()


def test_admm_matches_sklearn_lasso() -> None:
    from sklearn.linear_model import Lasso

    gen = torch.Generator().manual_seed(2)
    basis = torch.randn(30, 10, generator=gen, dtype=torch.float64)
    target = torch.randn(30, 1, generator=gen, dtype=torch.float64)
    alpha = 2.0  # ours: ½‖x − Bs‖² + α‖s‖₁; sklearn: (1/2n)‖x − Bs‖² + a‖s‖₁, so a = α/n
    codes = admm_codes(basis.T @ basis, basis.T @ target, alpha, iterations=3000)
    lasso = Lasso(alpha=alpha / 30, fit_intercept=False, tol=1e-12, max_iter=100_000)
    lasso.fit(basis.numpy(), target.numpy().ravel())
    np.testing.assert_allclose(codes.numpy().ravel(), lasso.coef_, atol=1e-6)


def test_coordinate_descent_decreases_the_objective_and_keeps_atoms_unit_norm(digits) -> None:
    model = fresh(digits.spec)
    x, y = torch.from_numpy(digits.x_train[:300]), torch.from_numpy(digits.y_train[:300])
    codes = model.training_codes(x, y)
    before = model.objective(x, y, codes)
    new = dictionary_step(model.B, model.W, model.A, model.statistics(x, y, codes), model.atom_classes)
    model.B.data, model.W.data, model.A.data = new
    after = model.objective(x, y, codes)
    assert after < 0.9 * before, (before, after)
    for matrix in new:
        np.testing.assert_allclose(matrix.norm(dim=0).numpy(), 1.0, atol=1e-12)


def test_a_coordinate_step_is_the_exact_minimiser_of_each_column() -> None:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    target = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    start = torch.nn.functional.normalize(torch.randn(8, 6, generator=gen, dtype=torch.float64), dim=0)
    one = coordinate_descent(start, codes @ codes.T, target @ codes.T)
    loss = lambda d: float((target - d @ codes).square().sum())  # noqa: E731
    assert loss(one) < loss(start)
    # Perturbing any one column (then renormalising) cannot do better than the sweep's last column.
    for _ in range(20):
        other = one.clone()
        other[:, -1] = torch.nn.functional.normalize(
            one[:, -1] + 0.05 * torch.randn(8, generator=gen, dtype=torch.float64), dim=0
        )
        assert loss(other) >= loss(one) - 1e-9


def client_records(model: Ledl, x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray]) -> list[dict]:
    """Each client's extra records after its local round (a shuffling loader, batch 32)."""
    records = []
    for part in parts:
        client = copy.deepcopy(model)
        data = TensorDataset(x[part], y[part], torch.arange(len(part)))
        loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(7))
        client.local_update(loader, SETTINGS, 1)
        records.append(client.extra_records())
    return records


def test_federated_step_equals_the_centralised_one(digits) -> None:
    model = fresh(digits.spec)
    x, y = torch.from_numpy(digits.x_train[:600]), torch.from_numpy(digits.y_train[:600])
    parts = np.split(np.random.default_rng(0).permutation(600), [50, 51, 300, 420])  # uneven, one of 1
    state = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    federated = state
    for _ in range(2):
        model.load_state_dict({k: torch.from_numpy(v) for k, v in federated.items()})
        records = client_records(model, x, y, parts)
        assert all(model.extra_record_problem(STATISTICS, r[STATISTICS]) is None for r in records)
        federated = model.after_aggregation(federated, federated, records, SETTINGS, 1)
    centralised = fresh(digits.spec)
    for _ in range(2):
        centralised.centralised_step(x, y)
    for name in ("B", "W", "A"):
        gap = np.abs(federated[name] - getattr(centralised, name).numpy()).max()
        assert gap < 1e-10, (name, gap)
    assert np.abs(federated["B"] - state["B"]).max() > 0.1, "the step must move the dictionary"


def test_the_statistics_are_sums_the_server_can_check(digits) -> None:
    model = fresh(digits.spec)
    x, y = torch.from_numpy(digits.x_train[:60]), torch.from_numpy(digits.y_train[:60])
    whole = model.statistics(x, y)
    halves = model.statistics(x[:25], y[:25]) + model.statistics(x[25:], y[25:])
    torch.testing.assert_close(halves.xct, whole.xct, atol=1e-10, rtol=0)
    torch.testing.assert_close(halves.cct, whole.cct, atol=1e-10, rtol=0)
    record = whole.to_record()
    assert model.extra_record_problem(STATISTICS, record) is None
    assert "shape" in model.extra_record_problem(STATISTICS, {**record, "xct": record["xct"][:3]})
    assert "samples" in model.extra_record_problem(STATISTICS, {**record, "samples": 0})
    assert "unexpected" in model.extra_record_problem("other", record)
    # No valid record: the round's start is kept.
    start = {k: v.numpy() for k, v in model.state_dict().items()}
    kept = model.after_aggregation(start, start, [], SETTINGS, 1)
    assert all(np.array_equal(kept[k], start[k]) for k in start)


def test_ledl_classifies_digits(digits) -> None:
    model = fresh(digits.spec)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    for _ in range(4):
        model.centralised_step(x, y)
    accuracy = float((model(torch.from_numpy(digits.x_test)).argmax(1).numpy() == digits.y_test).mean())
    assert accuracy >= 0.88, accuracy


def test_one_sample_statistics_give_the_sample_back(digits) -> None:
    model = fresh(digits.spec)
    x, y = torch.from_numpy(digits.x_train[:1]), torch.from_numpy(digits.y_train[:1])
    stats = model.statistics(x, y)
    recovered, classes = invert_statistics(stats.xct.numpy(), stats.yct.numpy())
    assert classes.tolist() == [int(y[0])]
    np.testing.assert_allclose(recovered[:, 0], x.reshape(-1).double().numpy(), atol=1e-8)


def test_the_audit_declines_gradient_attacks_and_measures_the_statistics(digits) -> None:
    model = fresh(digits.spec)
    audit = audit_model(model, digits.x_test[:2], digits.y_test[:2], ["auto", "inverting-gradients"])
    assert {row.status for row in audit.rows} == {"declined"} and len(audit.rows) == 4
    assert all("not trained by gradients" in row.note for row in audit.rows)
    (disclosure,) = audit.architecture.disclosures
    assert disclosure.channel == "dictionary statistics"
    assert disclosure.psnr > 100 > 20 > disclosure.baseline_psnr
    assert "gradient attacks: none apply" in audit.architecture.to_table()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"atoms_per_class": 0}, "atoms_per_class"),
        ({"alpha": -1.0}, "alpha"),
        ({"rho": 0.0}, "rho"),
        ({"admm_iterations": 0}, "admm_iterations"),
    ],
)
def test_bad_options_are_refused(digits, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("ledl", digits.spec, **options)


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"defence": "dp-sgd"}, "--defence"),
        ({"defence": "clip"}, "--defence"),
        ({"strategy": "fedadam"}, "--strategy"),
        ({"strategy": "krum"}, "--strategy"),
        ({"central_dp": "server"}, "--central-dp"),
        ({"audit": True}, "--audit"),
    ],
)
def test_what_needs_gradients_is_refused_at_plan_time(digits, changes, flag) -> None:
    config = RunConfig(model="ledl", dataset="digits", num_clients=2, rounds=1).replace(**changes)
    with pytest.raises(UserInputError, match=flag):
        check_gradient_free(config, digits.spec)


def test_secagg_is_refused_and_plain_fedavg_accepted() -> None:
    with pytest.raises(UserInputError, match="secagg"):
        validate_plan(RunConfig(model="ledl", dataset="digits", num_clients=3, rounds=1, secagg=True))
    validate_plan(RunConfig(model="ledl", dataset="digits", num_clients=3, rounds=1))
