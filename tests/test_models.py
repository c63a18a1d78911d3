"""The zoo's classifiers: one interface, R-GAP's exact CNN6 / CNN6-d, and they train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.training.local import evaluate, model_for, train_locally
from models import InputSpec, available_models, build_model


def _convs(model: nn.Module) -> list[tuple[int, int, int, int, int, bool]]:
    return [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.bias is not None)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]


def test_cnn6_matches_rgap() -> None:
    model = build_model("cnn6", InputSpec((3, 32, 32), 10))
    assert _convs(model) == [
        (3, 12, 4, 2, 2, False),
        (12, 36, 3, 2, 1, False),
        (36, 36, 3, 1, 1, False),
        (36, 36, 3, 1, 1, False),
        (36, 64, 3, 2, 1, False),
        (64, 128, 3, 1, 1, False),
    ]
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 6 and all(a.negative_slope == 0.2 for a in acts)
    head = model.layers[-1]
    assert isinstance(head, nn.Linear) and head.in_features == 3200 and head.bias is not None


def test_cnn6_d_narrows_the_second_conv() -> None:
    convs = _convs(build_model("cnn6-d", InputSpec((3, 32, 32), 10)))
    assert convs[1][:2] == (12, 20) and convs[2][:2] == (20, 36)


def test_logistic_head_is_one_bias_free_logit() -> None:
    model = build_model("cnn6", InputSpec((3, 32, 32), 10), head="logistic")
    assert model.layers[-1].out_features == 1 and model.layers[-1].bias is None
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1)


@pytest.mark.parametrize("name", available_models())
def test_every_model_maps_inputs_to_class_scores(name: str) -> None:
    for shape in [(1, 32, 32), (3, 32, 32)]:
        model = build_model(name, InputSpec(shape, 10))
        assert model(torch.rand(4, *shape)).shape == (4, 10)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="choose one of: cnn6"):
        build_model("resnet", InputSpec((3, 32, 32), 10))


def test_cnn6_trains_without_nan_on_32px_digits() -> None:
    config = RunConfig(model="cnn6", image_size=32, num_clients=6, learning_rate=0.05, local_epochs=2)
    model = model_for(config)
    data = client_data(config, 0)
    before, _ = evaluate(model, data.x_train, data.y_train)
    result = train_locally(model, data, config, server_round=1, partition_id=0)
    after, _ = evaluate(model, data.x_train, data.y_train)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert after < before - 0.005, f"training loss did not fall: {before:.4f} -> {after:.4f}"
    assert result.steps == 2 * -(-len(data.y_train) // config.batch_size)


def test_fedprox_term_keeps_weights_near_the_global_model() -> None:
    config = RunConfig(num_clients=2, local_epochs=3)

    def drift(mu: float) -> float:
        model = model_for(config)
        start = [p.detach().clone() for p in model.parameters()]
        train_locally(model, client_data(config, 0), config, server_round=1, partition_id=0, proximal_mu=mu)
        with torch.no_grad():
            return float(sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True)))

    assert drift(5.0) < 0.5 * drift(0.0)
