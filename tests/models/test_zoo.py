"""The zoo's classifiers: one contract, R-GAP's exact CNN6 / CNN6-d, and they train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.errors import UserInputError
from fedsim.plan.planning import check_model_fits, validate_plan
from fedsim.training.local import evaluate, model_for, train_locally
from models import (
    MODELS,
    InputSpec,
    ModelEntry,
    TrainingSettings,
    UnsupportedInputError,
    available_models,
    build_model,
)
from models.classifiers import SequentialClassifier
from tests.support.optional import require_minilm, require_smollm2


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


LANGUAGE_MODELS = {"cloze", "smollm2"}
# Pretrained families read only their own tokenizer's ids: (vocabulary, its size, the skip).
PRETRAINED = {"minilm": ("minilm", 30522, require_minilm), "smollm2": ("smollm2", 49152, require_smollm2)}


@pytest.mark.parametrize("name", available_models())
def test_every_model_maps_inputs_to_class_scores(name: str) -> None:
    if name in PRETRAINED:  # refuses every other spec before loading weights, then scores its own
        vocabulary, size, require = PRETRAINED[name]
        refusals = (
            (InputSpec((1, 32, 32), 10), "takes tokens inputs, not image"),  # the registry's line
            (InputSpec.tokens(16, 50, 10), f"use --dataset fortunes-{vocabulary}"),  # the family's own
        )
        for spec, message in refusals:
            with pytest.raises(UnsupportedInputError, match=message):
                build_model(name, spec)
        require()
        model = build_model(name, InputSpec.tokens(16, size, 10, vocabulary))
        expected = (4, 16, size) if name in LANGUAGE_MODELS else (4, 10)
        assert model(torch.randint(1, size, (4, 16))).shape == expected
        return
    try:
        build_model(name, InputSpec((1, 32, 32), 10))
    except UnsupportedInputError:  # a token-only family (e.g. ltw)
        model = build_model(name, InputSpec.tokens(16, 50, 10))
        # a language model (cloze) scores the vocabulary at every position instead
        expected = (4, 16, 50) if name in LANGUAGE_MODELS else (4, 10)
        assert model(torch.randint(0, 50, (4, 16))).shape == expected
        return
    for shape in [(1, 32, 32), (3, 32, 32)]:
        model = build_model(name, InputSpec(shape, 10))
        assert model(torch.rand(4, *shape)).shape == (4, 10)


def test_mlp_takes_feature_vectors_and_convnets_refuse_them() -> None:
    spec = InputSpec.features(30, 2)
    assert build_model("mlp", spec)(torch.rand(4, 30)).shape == (4, 2)
    for name in ("lenet", "cnn6", "cnn6-d"):
        with pytest.raises(UnsupportedInputError, match=f"model '{name}' takes image inputs, not features"):
            build_model(name, spec)
    with pytest.raises(UnsupportedInputError, match="takes image or features inputs, not tokens"):
        build_model("mlp", InputSpec.tokens(8, 50, 2))


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (((3, 32), 10), "image samples need a 3-d"),
        (((8,), 2, "tokens", None), "need vocab_size"),
        (((8,), 2, "tokens", (0.0, 1.0), 50), "no value range"),
        (((8,), 2, "features", (0.0, 1.0), 50), "vocab_size applies to token inputs only"),
        (((8,), 0, "features"), "num_classes must be at least 1"),
        (((8,), 2, "audio"), "unknown modality"),
    ],
)
def test_input_spec_refuses_what_no_sample_can_be(args: tuple, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        InputSpec(*args)


def test_planning_checks_the_model_against_the_datasets_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    validate_plan(RunConfig(dataset="breast-cancer", model="mlp", num_clients=5))
    # The list names every feature-taking model (more join as the zoo grows); mlp is one of them.
    with pytest.raises(UserInputError, match=r"pick a model that does: ([\w-]+, )*mlp(,|$)"):
        validate_plan(RunConfig(dataset="breast-cancer", model="lenet", num_clients=5))

    def fixed_size(spec: InputSpec) -> SequentialClassifier:  # ignores the spec's shape
        return SequentialClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, spec.num_classes)), spec)

    monkeypatch.setitem(MODELS, "fixed-64", ModelEntry(fixed_size, ("image",), "digits"))
    check_model_fits("fixed-64", "digits", InputSpec.image((1, 8, 8), 10), torch.rand(1, 1, 8, 8))
    with pytest.raises(
        UserInputError, match=r"does not fit 'photos' image inputs of shape .*--image-size 32"
    ):
        check_model_fits("fixed-64", "photos", InputSpec.image((3, 32, 32), 10), torch.rand(1, 3, 32, 32))


def test_logistic_head_converts_labels_to_parity_in_one_place() -> None:
    model = build_model("mlp", InputSpec((1, 8, 8), 10), head="logistic")
    labels = torch.tensor([3, 4, 7, 8])
    targets = model.targets(labels)
    assert targets.tolist() == [1, 0, 1, 0]
    outputs = model(torch.rand(4, 1, 8, 8))
    expected = nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets.float())
    assert torch.equal(model.loss(outputs, targets), expected)
    # Evaluation compares predictions with the same targets: a logit > 0 predicts an odd label.
    forced = torch.tensor([[5.0], [-5.0], [-5.0], [-5.0]])
    assert model.metrics(forced, targets) == {"accuracy": 0.75}


def test_evaluation_weights_each_batch_by_its_size() -> None:
    model = build_model("mlp", InputSpec((1, 8, 8), 10))
    inputs, labels = torch.rand(103, 1, 8, 8), torch.randint(0, 10, (103,))
    whole = evaluate(model, inputs, labels)
    pieces = evaluate(model, inputs, labels, batch_size=10)  # ten batches of 10 and one of 3
    assert whole.num_examples == pieces.num_examples == 103
    assert abs(whole.loss - pieces.loss) < 1e-6
    correct = int((model(inputs).argmax(-1) == labels).sum())
    for result in (whole, pieces):
        assert abs(result.metrics["accuracy"] - correct / 103) < 1e-6


def test_default_optimizer_is_sgd_over_trainable_parameters() -> None:
    model = build_model("mlp", InputSpec((1, 8, 8), 10))
    model.layers[1].weight.requires_grad_(False)
    optimizer = model.configure_optimizer(TrainingSettings(learning_rate=0.05, momentum=0.8), server_round=1)
    assert isinstance(optimizer, torch.optim.SGD)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"]) == (0.05, 0.8)
    assert len(group["params"]) == len(list(model.parameters())) - 1


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="choose one of: cloze, cnn6"):
        build_model("resnet", InputSpec((3, 32, 32), 10))


def test_cnn6_trains_without_nan_on_32px_digits() -> None:
    config = RunConfig(model="cnn6", image_size=32, num_clients=6, learning_rate=0.05, local_epochs=2)
    model = model_for(config)
    data = client_data(config, 0)
    before = evaluate(model, data.x_train, data.y_train).loss
    result = train_locally(model, data, config, server_round=1, partition_id=0)
    after = evaluate(model, data.x_train, data.y_train).loss
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


def test_model_options_come_typed_from_the_builders_signature() -> None:
    from models import model_options, parse_model_options

    assert [str(o) for o in model_options("mlp")] == ["hidden=128", "depth=2", "head=ce"]
    assert parse_model_options("mlp", " hidden=64 , depth=3,,") == {"hidden": 64, "depth": 3}
    assert parse_model_options("lenet", "activation=tanh") == {"activation": "tanh"}
    with pytest.raises(ValueError, match="not a whole number"):
        parse_model_options("mlp", "hidden=1e3")


def test_model_options_reach_the_run_model() -> None:
    config = RunConfig(model="mlp", model_options="hidden=16,depth=1")
    widths = [m.out_features for m in model_for(config).modules() if isinstance(m, nn.Linear)]
    assert widths == [16, 10]
