"""Text DNN (de Andrade 2019): the pretraining schedule on the round clock, frozen groups, the
denoising-autoencoder loss, Nesterov, option checks, the SVM baseline's shared features, the audit
and a federation on fortunes-lsa that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedsim
from fedsim.config.run_config import RunConfig
from fedsim.data.registry import load_dataset
from fedsim.errors import UserInputError
from fedsim.plan.planning import validate_plan
from models import InputSpec, TrainingSettings, build_model, parse_model_options
from models.text_dnn import PretrainSchedule, TextDNN
from tests.support.optional import require_fortunes

LSA = InputSpec.features(100, 6, value_range=None)


def _dnn(spec: InputSpec = LSA, **options: object) -> TextDNN:
    torch.manual_seed(0)
    model = build_model("text-dnn", spec, **options)
    assert isinstance(model, TextDNN)
    return model


@pytest.mark.parametrize(
    ("hidden", "per_layer", "rounds", "phases"),
    [
        (3, 1, 8, [0, 1, 2, None, None, None, None, None]),
        (2, 2, 10, [0, 0, 1, 1, None, None, None, None, None, None]),
        (3, 2, 8, [0, 1, 2, None, None, None, None, None]),  # capped at half the run: 1 per layer
        (3, 1, 5, [None] * 5),  # 5 // 2 < 3 layers: no pretraining, a short run fine-tunes only
        (2, 0, 6, [None] * 6),
    ],
)
def test_schedule_pretrains_layer_by_layer_then_fine_tunes(
    hidden: int, per_layer: int, rounds: int, phases: list[int | None]
) -> None:
    schedule = PretrainSchedule(hidden, per_layer)
    assert [schedule.layer(r, rounds) for r in range(1, rounds + 1)] == phases
    assert sum(p is not None for p in phases) <= rounds // 2


def _train(model: TextDNN, server_round: int, rounds: int = 8, steps: int = 5, seed: int = 0) -> float:
    """A few local steps of round `server_round`; the loss of the last one."""
    optimizer = model.configure_optimizer(TrainingSettings(0.05, momentum=0.9, rounds=rounds), server_round)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 100, generator=generator), torch.randint(0, 6, (32,), generator=generator)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.training_loss(model, x, y)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@pytest.mark.parametrize(("server_round", "layer"), [(1, 0), (2, 1), (3, 2), (4, None)])
def test_only_the_scheduled_groups_change_in_a_round(server_round: int, layer: int | None) -> None:
    model = _dnn(widths="32-16-8")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    _train(model, server_round)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    index = {0: 1, 1: 3, 2: 5}
    if layer is None:
        expected = {f"layers.{i}.{p}" for i in (1, 3, 5, 7) for p in ("weight", "bias")}
    else:
        expected = {f"layers.{index[layer]}.{p}" for p in ("weight", "bias")}
        expected |= {f"decoders.{layer}.{p}" for p in ("weight", "bias")}
    assert changed == expected
    model.run_settings = TrainingSettings(0.05, momentum=0.9, rounds=8)  # what _train used
    assert set(model.sent_names(server_round)) == expected, "the client sends exactly what trained"


def test_after_aggregation_resets_frozen_tensors_bit_exact() -> None:
    model = _dnn(widths="32-16")
    previous = {n: t.numpy().copy() for n, t in model.state_dict().items()}
    aggregated = {n: a + np.float32(1e-7) for n, a in previous.items()}  # an average that rounded
    settings = TrainingSettings(0.1, momentum=0.9, rounds=6)
    result = model.after_aggregation(aggregated, previous, [], settings, server_round=2)  # layer 1's round
    trained = {"layers.3.weight", "layers.3.bias", "decoders.1.weight", "decoders.1.bias"}
    for name, array in result.items():
        assert array is (aggregated[name] if name in trained else previous[name]), name
    finetune = model.after_aggregation(aggregated, previous, [], settings, server_round=3)
    assert {n for n in finetune if finetune[n] is aggregated[n]} == {
        f"layers.{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")
    }


def test_denoising_autoencoder_loss_decreases_on_a_tiny_problem() -> None:
    model = _dnn(widths="16-8", noise=0.3)
    first = _train(model, server_round=1, steps=1)
    last = _train(model, server_round=1, steps=200)
    assert last < 0.7 * first, (first, last)
    # the loss is the reconstruction of the clean input, not the class loss
    model.configure_optimizer(TrainingSettings(0.05, momentum=0.9, rounds=8), 1)
    x = torch.randn(4, 100)
    torch.manual_seed(1)
    loss = model.training_loss(model, x, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(1)
    assert loss.item() == pytest.approx(model.reconstruction_loss(x, 0).item())
    assert loss.item() != pytest.approx(model.loss(model(x), torch.zeros(4, dtype=torch.long)).item())


def test_second_layer_is_pretrained_on_first_layer_codes() -> None:
    model = _dnn(widths="16-8", noise=0.0)
    x = torch.randn(5, 100)
    codes = torch.tanh(model.encoder(0)(x))
    assert torch.allclose(model.code_below(x, 1), codes)
    expected = torch.nn.functional.mse_loss(model.decoders[1](torch.tanh(model.encoder(1)(codes))), codes)
    assert model.reconstruction_loss(x, 1).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("nesterov", [True, False])
def test_nesterov_flag_reaches_the_optimiser(nesterov: bool) -> None:
    model = _dnn(nesterov=nesterov)
    optimizer = model.configure_optimizer(TrainingSettings(0.05, momentum=0.8, rounds=4), 4)
    assert all(g["nesterov"] is nesterov and g["momentum"] == 0.8 for g in optimizer.param_groups)


def test_nesterov_without_momentum_is_refused_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"nesterov=true needs a momentum > 0.*--momentum 0\.9"):
        _dnn().configure_optimizer(TrainingSettings(0.05, momentum=0.0, rounds=4), 1)
    _dnn(nesterov=False).configure_optimizer(TrainingSettings(0.05, momentum=0.0, rounds=4), 1)
    # a run is refused at planning, before any client fails on it
    config = RunConfig(dataset="breast-cancer", model="text-dnn", momentum=0.0, num_clients=3)
    with pytest.raises(UserInputError, match=r"model 'text-dnn': nesterov=true needs a momentum > 0"):
        validate_plan(config)
    validate_plan(RunConfig(dataset="breast-cancer", model="text-dnn", momentum=0.9, num_clients=3))


def test_glorot_initialisation_with_tanh_gain() -> None:
    model = _dnn(widths="64-32")
    first = model.encoder(0).weight
    bound = (5 / 3) * (6 / (100 + 64)) ** 0.5
    assert float(first.abs().max()) <= bound and float(first.abs().max()) > 0.9 * bound
    assert float(model.encoder(0).bias.abs().max()) == 0.0
    assert [type(m).__name__ for m in model.layers] == [
        "Flatten",
        "Linear",
        "Tanh",
        "Linear",
        "Tanh",
        "Linear",
    ]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("widths=64-x", "widths='64-x' is not positive whole numbers joined by '-'"),
        ("pretrain_rounds_per_layer=-1", "pretrain_rounds_per_layer must be >= 0"),
        ("noise=1", r"noise is the masking probability, in \[0, 1\)"),
        ("noise=-0.1", "noise is the masking probability"),
        ("nesterov=maybe", "nesterov"),
    ],
)
def test_bad_options_are_refused(options: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_model("text-dnn", LSA, **parse_model_options("text-dnn", options))


def test_token_input_is_refused() -> None:
    with pytest.raises(ValueError, match="takes features or image inputs, not tokens"):
        build_model("text-dnn", InputSpec.tokens(8, 50, 2))


def test_svm_baseline_and_the_dnn_consume_the_same_lsa_features() -> None:
    require_fortunes()
    from benchmarks.fidelity import text_dnn as bench

    data = load_dataset("fortunes-lsa")
    features = bench.features()
    assert features.x_train is not None
    assert np.array_equal(features.x_train, data.x_train) and np.array_equal(features.x_test, data.x_test)
    assert features.x_train.shape[1] == data.spec.num_features == 100
    svm = bench.fit_svm(
        features.x_train[:600], features.y_train[:600], grid={"C": [10.0], "gamma": ["scale"]}
    )
    assert svm.n_features_in_ == 100
    accuracy = float((svm.predict(features.x_test) == features.y_test).mean())
    assert accuracy > 0.25, "the SVM on the LSA features is above chance (1/6)"


def test_audit_reports_text_dnn_and_which_attacks_apply(tmp_path: Path) -> None:
    result = fedsim.audit(
        model="text-dnn", dataset="breast-cancer", samples=1, attacks="auto", out=tmp_path / "audit"
    )
    report = result.security_report
    assert report is not None and not report.untreated
    assert list(result.security["kind"]) == ["Linear"] * 4
    row = result.summary.set_index("attack").loc["auto"]
    assert row["reconstructed"] == 1 and row["failed"] == 0
    assert str(row["note"]).startswith("auto chose layerwise: its systems cover the network")
    # feature vectors have no PSNR, so measure the recovery directly: the exact gradient of a
    # first Linear layer gives the input back (x = dL/dW_i / dL/db_i)
    (recovered,) = result.reconstructions.values()
    inputs = np.asarray(result.inputs).reshape(1, -1)
    error = np.abs(np.asarray(recovered).reshape(1, -1) - inputs).max()
    assert error <= 1e-4 * np.abs(inputs).max(), error
