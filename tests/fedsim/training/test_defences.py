"""Client-side defences on the training seam: DP-SGD through Opacus, and the update-level clip,
top-k and Gaussian noise, each checked against its definition on real updates, then attacked."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import CollateFnWithEmpty
from torch import nn
from typer.testing import CliRunner

from fedsim import cli
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.errors import UserInputError
from fedsim.plan.planning import validate_plan
from fedsim.training.defences import kept_entries
from fedsim.training.local import TrainResult, model_for, train_locally
from fedsim.training.transforms import TRANSFORMATIONS
from models import MODELS, InputSpec, ModelEntry
from models.classifiers import SequentialClassifier

DIGITS = RunConfig(num_clients=4, local_epochs=1, batch_size=16, learning_rate=0.5, momentum=0.0)


def train(config: RunConfig, server_round: int = 1, partition_id: int = 0) -> tuple[TrainResult, dict]:
    """One client's round from the run's initial model; returns the result and the update Δ."""
    model = model_for(config)
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = train_locally(model, client_data(config, partition_id), config, server_round, partition_id)
    return result, {name: result.weights[name] - start[name] for name in start}


def norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


# --- update-level defences ----------------------------------------------------------------------
def test_clip_scales_a_long_update_down_to_the_norm_and_keeps_its_direction() -> None:
    _, plain = train(DIGITS)
    assert norm(plain) > 0.05
    result, clipped = train(DIGITS.replace(defence="clip", clipping_norm=0.05))
    assert result.defences == ("clip(C=0.05)",)
    assert norm(clipped) == pytest.approx(0.05, rel=1e-5)
    scale = 0.05 / norm(plain)
    for name, tensor in clipped.items():
        torch.testing.assert_close(tensor, plain[name] * scale, rtol=0, atol=1e-7)

    _, short = train(DIGITS.replace(defence="clip", clipping_norm=2 * norm(plain)))
    assert all(torch.equal(short[name], plain[name]) for name in plain), "a short update is left alone"


def test_topk_keeps_exactly_the_largest_share_of_each_tensor() -> None:
    _, plain = train(DIGITS)
    result, sparse = train(DIGITS.replace(defence="topk", keep=0.1))
    assert result.defences == ("topk(0.1)",)
    for name, tensor in sparse.items():
        kept = tensor != 0
        assert int(kept.sum()) == kept_entries(0.1, tensor.numel()) == max(1, -(-tensor.numel() // 10))
        assert torch.equal(tensor[kept], plain[name][kept]), "kept entries are the update's own"
        dropped = plain[name][~kept].abs()
        assert dropped.numel() == 0 or float(plain[name][kept].abs().min()) >= float(dropped.max()), name
    assert kept_entries(0.1, 30) == 3 and kept_entries(0.1, 5) == 1 and kept_entries(1.0, 7) == 7


def test_gaussian_adds_noise_of_the_given_std_and_repeats_under_the_seed() -> None:
    _, plain = train(DIGITS)
    config = DIGITS.replace(defence="gaussian", noise_std=0.02)
    result, noised = train(config)
    assert result.defences == ("gaussian(std=0.02)",) and result.privacy == ()
    noise = torch.cat([(noised[name] - plain[name]).reshape(-1) for name in plain]).double()
    assert noise.numel() > 20_000
    assert float(noise.std()) == pytest.approx(0.02, rel=0.03)
    assert abs(float(noise.mean())) < 0.02 * 5 / math.sqrt(noise.numel())
    again = train(config)[1]
    assert all(torch.equal(noised[name], again[name]) for name in noised), "seeded by the round"
    name = "layers.1.weight"
    round_two = train(config, server_round=2)[1][name] - train(DIGITS, server_round=2)[1][name]
    assert not torch.allclose(round_two, noised[name] - plain[name]), "each round draws fresh noise"


def test_update_defences_apply_in_the_order_listed() -> None:
    base = DIGITS.replace(clipping_norm=0.05, noise_std=0.01)
    result, clip_then_noise = train(base.replace(defence="clip,gaussian"))
    _, noise_then_clip = train(base.replace(defence="gaussian,clip"))
    assert result.defences == ("clip(C=0.05)", "gaussian(std=0.01)")
    entries = sum(t.numel() for t in clip_then_noise.values())
    expected = math.sqrt(0.05**2 + entries * 0.01**2)  # noise, nearly orthogonal to the clipped update
    assert norm(clip_then_noise) == pytest.approx(expected, rel=0.02)
    assert norm(noise_then_clip) == pytest.approx(0.05, rel=1e-5)


# --- DP-SGD through Opacus ----------------------------------------------------------------------
DP = DIGITS.replace(defence="dp-sgd", noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-5)


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("poisson", [True, False], ids=["poisson", "shuffle"])
def test_dp_sgd_reports_the_epsilon_of_opacus_accountant(poisson: bool) -> None:
    config = DP.replace(poisson_sampling=poisson)
    result, update = train(config)
    batches = math.ceil(len(client_data(config, 0).y_train) / config.batch_size)
    (spend,) = result.privacy
    assert result.defences == ("dp-sgd(z=1.1,C=1)",)
    assert (spend.mechanism, spend.sampling) == ("dp-sgd", "poisson" if poisson else "shuffle")
    assert (spend.noise_multiplier, spend.clip_norm, spend.delta) == (1.1, 1.0, 1e-5)
    assert spend.sample_rate == 1 / batches and spend.steps == result.steps == batches
    assert spend.epsilon == opacus_epsilon(1.1, 1 / batches, batches, 1e-5)
    assert 0 < spend.epsilon < 10 and norm(update) > 0


def test_dp_sgd_with_a_target_epsilon_spends_at_most_it_over_the_run() -> None:
    config = DP.replace(target_epsilon=2.0, rounds=3, local_epochs=2, max_local_steps=5)
    result, _ = train(config)
    (spend,) = result.privacy
    assert spend.steps == 5 and result.defences == (f"dp-sgd(z={spend.noise_multiplier:.4g},C=1)",)
    assert spend.noise_multiplier != DP.noise_multiplier
    run = opacus_epsilon(spend.noise_multiplier, spend.sample_rate, config.rounds * spend.steps, 1e-5)
    assert 2.0 - 0.05 < run <= 2.0, "calibrated to the run's steps, within Opacus's search tolerance"
    assert spend.epsilon < run


def test_dp_sgd_repeats_bit_for_bit_under_the_seed() -> None:
    first, second = train(DP)[0], train(DP)[0]
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert first.seen.tolist() == second.seen.tolist()
    other = train(DP, server_round=2)[0]
    assert not torch.equal(first.weights["layers.1.weight"], other.weights["layers.1.weight"])


def test_dp_sgd_unwraps_to_the_model_without_hooks_or_per_sample_gradients() -> None:
    model = model_for(DP)
    keys = list(model.state_dict())
    result = train_locally(model, client_data(DP, 0), DP, 1, 0)
    assert list(result.weights) == keys
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for layer in model.modules():
        assert not (layer._forward_hooks or layer._backward_hooks or layer._forward_pre_hooks), layer
        assert not hasattr(layer, "activations") and not hasattr(layer, "max_batch_len")
    for parameter in model.parameters():
        for attribute in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
            assert not hasattr(parameter, attribute), attribute
    # the model trains on as a plain module: a second round without the defence works on it
    train_locally(model, client_data(DIGITS, 0), DIGITS, 2, 0)


def test_empty_poisson_batches_are_noise_only_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[list[int]] = []  # the sample indices of each batch Opacus's loader collates
    collate = CollateFnWithEmpty.__call__

    def recording(self: CollateFnWithEmpty, batch: list) -> object:
        batches.append([int(sample[2]) for sample in batch])
        return collate(self, batch)

    monkeypatch.setattr(CollateFnWithEmpty, "__call__", recording)
    config = DP.replace(batch_size=1, max_local_steps=40)  # q = 1/N: about a third of batches are empty
    size = len(client_data(config, 0).y_train)
    result, update = train(config)
    trained = batches[:40]  # the loader collates one more batch before the loop stops
    assert sum(not batch for batch in trained) > 5, "the test needs empty batches"
    (spend,) = result.privacy
    assert result.steps == spend.steps == 40 and math.isfinite(result.train_loss)
    assert all(bool(torch.isfinite(t).all()) for t in update.values())
    assert result.seen.tolist() == list(dict.fromkeys(i for batch in trained for i in batch))
    assert result.num_examples == round(size * (1 - (1 - 1 / size) ** 40)), "expected, not realised"


def test_fedsgd_under_poisson_sampling_reports_one_expected_sample() -> None:
    result, _ = train(DP.replace(batch_size=1, max_local_steps=1))
    assert result.num_examples == 1 and result.steps == 1


# --- plan-time checks ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"defence": "clip,topk,clip"}, "--defence lists clip more than once; list each defence once"),
        (
            {"target_epsilon": 3.0},
            "--target-epsilon 3 calibrates DP-SGD's noise, but --defence has no dp-sgd",
        ),
        (
            {"defence": "dp-sgd", "noise_multiplier": 0.0},
            "dp-sgd with --noise-multiplier 0 adds no noise, so its ε would be infinite",
        ),
        (
            {"defence": "dp-sgd", "strategy": "fedprox"},
            "drops FedProx's proximal term; use --strategy fedavg",
        ),
    ],
)
def test_bad_defence_combinations_are_refused_at_plan_time(changes: dict, message: str) -> None:
    with pytest.raises(UserInputError) as caught:
        validate_plan(DIGITS.replace(**changes))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_good_defence_combinations_pass_the_plan() -> None:
    validate_plan(DIGITS.replace(defence="dp-sgd", noise_multiplier=0.0, target_epsilon=3.0))
    validate_plan(DIGITS.replace(defence="clip,dp-sgd,topk,gaussian"))


def batchnorm_net(spec: InputSpec) -> SequentialClassifier:
    channels, height, width = spec.shape
    layers = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(6 * height * width, spec.num_classes),
    )  # fmt: skip
    return SequentialClassifier(layers, spec)


def test_a_model_opacus_rejects_fails_at_plan_time_naming_the_layer_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(MODELS, "bn-net", ModelEntry(batchnorm_net, ("image",), "digits"))
    runs = tmp_path / "runs"
    argv = ["fedsim", "run", "--model", "bn-net", "--defence", "dp-sgd", "--runs-dir", str(runs)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "error: dp-sgd cannot train model 'bn-net': Opacus rejects layer 'layers.1' (BatchNorm2d: BatchNorm "
        "cannot support training with differential privacy); replace it with GroupNorm(2, 6, eps=1e-05, "
        "affine=True, bias=True) as Opacus's ModuleValidator.fix does, or drop dp-sgd from --defence"
    ]
    assert not runs.exists()
    validate_plan(DIGITS.replace(model="bn-net", defence="clip"))  # only DP-SGD needs per-sample gradients


def test_defences_command_lists_each_defence_with_its_knobs() -> None:
    result = CliRunner().invoke(cli.cli, ["defences"])
    assert result.exit_code == 0
    client_side, _, server_side = result.output.partition("\nserver side (flags of their own):\n")
    lines = client_side.splitlines()
    assert len(lines) == 2 * len(TRANSFORMATIONS) and set(TRANSFORMATIONS) == {
        "dp-sgd",
        "clip",
        "topk",
        "gaussian",
    }
    for name, entry in TRANSFORMATIONS.items():
        at = next(i for i, line in enumerate(lines) if line.split()[0] == name)
        assert lines[at].endswith(entry.description) and entry.description.strip()
        for key in entry.knobs:
            assert RunConfig.knob(key).key == key and f"--{key} (" in lines[at + 1]
    assert "--keep (0.1)" in result.output and "--poisson-sampling (true)" in result.output
    assert "--central-dp server|client" in server_side and "--secagg-shares (3)" in server_side
