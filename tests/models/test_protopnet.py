"""ProtoPNet: its distances and loss, its stages on the round clock, the federated push (every
prototype a real training patch afterwards), the server hook's record validation, the audit and a
federation that goes through the push round."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.registry import load_dataset
from fedsim.strategy.chain import build_chain
from fedsim.strategy.model_hook import ModelRoundHook
from models import InputSpec, TrainingSettings, build_model
from models.protopnet import PROTOTYPES, PUSH_RECORD, ProtoPNet, ProtoSchedule, push_candidates
from tests.support.flower_messages import StaticGrid, act_as_server, arrays, train_reply
from tests.support.protopnet import DIGITS, FORWARD_ROUNDING, latent_patches, nearest_gap, protopnet_for


def _digits(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return torch.from_numpy(data.x_train[:count]), torch.from_numpy(data.y_train[:count])


def test_distances_similarity_and_loss_match_a_direct_computation() -> None:
    model = protopnet_for(prototypes_per_class=2)
    inputs, labels = _digits(12)
    patches = latent_patches(model, inputs)  # (N, HW, D)
    prototypes = model.prototype_vectors.detach().flatten(1)  # (P, D)
    direct = ((patches[:, :, None, :] - prototypes[None, None]) ** 2).sum(-1).min(dim=1).values  # (N, P)
    logits = model(inputs)
    assert torch.allclose(model._min_distances, direct, atol=1e-5)
    weights = model.last_layer.weight.detach()
    classes = torch.arange(20) // 2
    assert torch.equal(weights, torch.where(classes[None] == torch.arange(10)[:, None], 1.0, -0.5))
    similarity = torch.log((direct + 1) / (direct + 1e-4))
    assert torch.allclose(logits, similarity @ weights.T, atol=1e-4)

    own = classes[None] == labels[:, None]
    cluster = torch.stack([direct[i][own[i]].min() for i in range(12)]).mean()
    separation = torch.stack([direct[i][~own[i]].min() for i in range(12)]).mean()
    l1 = weights[~(classes[None] == torch.arange(10)[:, None])].abs().sum()
    expected = F.cross_entropy(logits, labels) + 0.8 * cluster - 0.08 * separation + 1e-4 * l1
    assert torch.allclose(model.training_loss(model, inputs, labels), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("rounds", "stages"),
    [
        (1, ["last"]),
        (3, ["joint", "last", "last"]),
        (4, ["warm", "joint", "last", "last"]),
        (6, ["warm", "joint", "joint", "joint", "last", "last"]),
    ],
)
def test_stages_follow_the_global_round_clock(rounds: int, stages: list[str]) -> None:
    schedule = ProtoSchedule(warm_rounds=1, last_layer_rounds=1)
    assert [schedule.stage(r, rounds) for r in range(1, rounds + 1)] == stages
    assert schedule.push_round(rounds) == max(1, rounds - 1)


def test_each_stage_trains_only_its_groups() -> None:
    model = protopnet_for()
    settings = TrainingSettings(learning_rate=0.1, rounds=6)
    for server_round, trained in ((1, {"add_on", "prototypes"}), (3, {"features", "add_on", "prototypes"}),
                                  (5, {"last_layer"})):  # fmt: skip
        optimizer = model.configure_optimizer(settings, server_round)
        groups = model._groups()
        expected = {id(p) for name in trained for p in groups[name]}
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == expected
        assert {id(p) for p in model.parameters() if p.requires_grad} == expected
        model.run_settings = settings
        names = {id(p): name for name, p in model.named_parameters()}
        assert set(model.sent_names(server_round)) == {names[i] for i in expected}, "sent: what trains"


def _push_round(
    model: ProtoPNet, settings: TrainingSettings, shards: list[tuple[torch.Tensor, torch.Tensor]]
):
    """Each client's push record, and the server's global model after the push round."""
    previous = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    # What an average of the clients' last-layer training could give; frozen tensors get noise too,
    # as a server optimiser or rounding might move them.
    aggregated = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in previous.items()}
    records = [{PUSH_RECORD: push_candidates(model, x, y).to_record()} for x, y in shards]
    push = model.schedule.push_round(settings.rounds)
    return previous, model.after_aggregation(aggregated, previous, records, settings, push)


def test_federated_push_leaves_every_prototype_a_real_training_patch_the_globally_nearest() -> None:
    model = protopnet_for()
    inputs, labels = _digits(400)
    shards = [(inputs[:200], labels[:200]), (inputs[200:], labels[200:])]
    settings = TrainingSettings(learning_rate=0.1, rounds=4)
    before = model.prototype_vectors.detach().flatten(1).clone()
    previous, result = _push_round(model, settings, shards)

    for name, array in result.items():
        if name != "last_layer.weight" and name != PROTOTYPES:
            assert np.array_equal(array, previous[name]), f"frozen {name} was not reset"
    pushed = torch.from_numpy(result[PROTOTYPES]).flatten(1)
    patches = latent_patches(model, inputs)  # the global latent space: frozen, so the same after the push
    classes = model.prototype_classes()
    for j in range(model.num_prototypes):
        own = patches[labels == classes[j]].reshape(-1, patches.shape[-1])
        assert nearest_gap(own, pushed[j]) <= FORWARD_ROUNDING, f"prototype {j} is no patch of its class"
        nearest = ((own - before[j]) ** 2).sum(dim=1).argmin()
        assert nearest_gap(own[nearest : nearest + 1], pushed[j]) <= FORWARD_ROUNDING, (
            f"prototype {j} is not the globally nearest patch"
        )


def test_a_class_no_client_holds_keeps_its_prototypes() -> None:
    model = protopnet_for()
    inputs, labels = _digits(300)
    keep = labels != 3
    settings = TrainingSettings(learning_rate=0.1, rounds=4)
    previous, result = _push_round(model, settings, [(inputs[keep], labels[keep])])
    threes = (model.prototype_classes() == 3).numpy()
    assert np.array_equal(result[PROTOTYPES][threes], previous[PROTOTYPES][threes])
    assert not np.array_equal(result[PROTOTYPES][~threes], previous[PROTOTYPES][~threes])


def test_the_chain_pushes_from_valid_records_and_drops_bad_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    act_as_server(monkeypatch)
    model = protopnet_for()
    inputs, labels = _digits(300)
    config = RunConfig(model="protopnet", num_clients=3, rounds=2)
    settings = TrainingSettings(learning_rate=0.1, rounds=2)
    chain = build_chain(config, model=model, settings=settings)
    assert any(isinstance(link, ModelRoundHook) for link in chain.links())
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    list(
        chain.outer.configure_train(
            1, arrays(weights), wire.run_config_record(config), StaticGrid([100, 101, 102])
        )
    )

    good = push_candidates(model, inputs[:150], labels[:150]).to_record()
    other = push_candidates(model, inputs[150:], labels[150:]).to_record()
    nan = {**other, "distances": np.full_like(other["distances"], np.nan)}  # would win every prototype
    short = {**other, "patches": other["patches"][:, :5]}
    replies = []
    for partition, record in enumerate((good, nan, short)):
        reply = train_reply(partition, weights)
        reply.content[wire.EXTRA_PREFIX + PUSH_RECORD] = wire.encode_extra(record)
        replies.append(reply)
    with caplog.at_level(logging.WARNING):
        aggregated, _ = chain.outer.aggregate_train(1, replies)
    assert "extra record 'push' of client 1: field 'distances' holds non-finite values" in caplog.text
    count, dim = model.prototype_vectors.shape[:2]
    assert f"of client 2: push field 'patches' is not an array of shape ({count}, {dim})" in caplog.text
    pushed = aggregated[PROTOTYPES].numpy().reshape(count, -1)
    assert np.array_equal(pushed, good["patches"]), "only the valid client's candidates are used"
    assert np.array_equal(aggregated["features.0.weight"].numpy(), weights["features.0.weight"])


def test_builder_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        build_model("protopnet", DIGITS, prototypes_per_class=0)
    with pytest.raises(ValueError, match="too small for 3 2x2 poolings; use 8x8 or more, or fewer blocks"):
        build_model("protopnet", InputSpec.image((1, 7, 7), 10))
    assert build_model("protopnet", InputSpec.image((1, 7, 7), 10), blocks=2).features[-1].kernel_size == 2
    with pytest.raises(ValueError, match="blocks must be at least 1"):
        build_model("protopnet", DIGITS, blocks=0)


def test_audit_reports_the_push_disclosure_and_runs_the_attacks() -> None:
    import fedsim

    result = fedsim.audit(
        model="protopnet",
        dataset="digits",
        samples=1,
        attacks="layerwise,inverting-gradients",
        model_options="width=4,prototype_dim=4,prototypes_per_class=1",  # small: IG takes 1000 steps
    )
    text = result.architecture.to_table()
    assert "layer-wise metric: not applicable" in text and "end-to-end J" in text
    assert "push" in text and "latent patch" in text
    attacks = {row.attack: row for row in result.audit_rows}
    assert "inverting-gradients" in attacks and attacks["inverting-gradients"].psnr is not None


def test_the_clients_push_record_pairs_each_patch_with_its_own_image_through_a_shuffling_loader() -> None:
    from fedsim.data.clients import ClientData
    from fedsim.training.local import client_loader

    model = protopnet_for()
    inputs, labels = _digits(200)
    settings = TrainingSettings(learning_rate=0.1, rounds=4)
    push = model.schedule.push_round(settings.rounds)
    model.configure_optimizer(settings, push)
    loader = client_loader(ClientData(inputs, labels, inputs[:1], labels[:1]), batch_size=16, seed=3)
    model.after_local_training(loader, push)
    record = model.extra_records()[PUSH_RECORD]
    patches = latent_patches(model, inputs)
    classes = model.prototype_classes()
    for j in range(model.num_prototypes):
        own = patches[labels == classes[j]].reshape(-1, patches.shape[-1])
        assert nearest_gap(own, torch.from_numpy(record["patches"][j])) <= FORWARD_ROUNDING, f"prototype {j}"
    model.configure_optimizer(settings, push - 1)
    model.after_local_training(loader, push - 1)
    assert model.extra_records() == {}, "only the push round sends candidates"
