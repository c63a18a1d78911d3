"""What travels: a model's federated entries (`federated_names`) and the ones a client sends back
in a round (`sent_names`).

The helpers are strict; a ULMFiT client in a gradual-unfreezing round replies with its unfrozen
groups only, and the server completes such a reply from the round's global model before it
validates and aggregates (frozen tensors bit-identical), while any other partial reply is still
rejected; defences act on the sent entries only; SecAgg+ refuses a model that sends part of its
federated model; and a model whose federated model is its readout alone trains in a federation
whose checkpoints hold nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from safetensors.torch import save_file
from torch import Tensor, nn

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.errors import RunFailedError, UserInputError
from fedsim.federation import client_app
from fedsim.plan.resume import open_for_resume
from fedsim.plan.secagg import check_secagg_model
from fedsim.store.run_store import RunStore
from fedsim.strategy.aggregators import build_strategy
from fedsim.strategy.auditor.strategy import weights_around
from fedsim.strategy.chain import build_chain
from fedsim.strategy.completion import ReplyCompletion
from fedsim.training.local import model_for, train_locally, training_settings
from models import InputSpec, ZooModel, build_model
from models.base import federated_state, load_federated_state
from models.random_features import RandomFeatures
from tests.support.flower_messages import StaticGrid, act_as_server, arrays, train_reply
from tests.support.optional import require_fortunes

FEATURES = InputSpec.features(6, 3)


class FrozenBase(ZooModel):
    """A frozen random layer (a parameter, requires_grad off, drawn from its own seed) and a
    trained head; only the head is federated, as with a pretrained base and its adapters."""

    def __init__(self, seed: int = 7) -> None:
        super().__init__(FEATURES)
        generator = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(6, 5)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(5, 6, generator=generator))
            self.base.bias.copy_(torch.randn(5, generator=generator))
        self.base.requires_grad_(False)
        self.top = nn.Linear(5, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.top(torch.relu(self.base(inputs)))

    def federated_names(self) -> tuple[str, ...]:
        return ("top.weight", "top.bias")


# --- the helpers -------------------------------------------------------------------------------
def test_the_default_federated_model_is_the_whole_state_dict_and_sends_it_all() -> None:
    model = build_model("mlp", FEATURES)
    assert model.federated_names() == tuple(model.state_dict())
    assert model.sent_names(3) == model.federated_names()
    assert list(federated_state(model)) == list(model.state_dict())
    plain = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))  # not a ZooModel: every entry
    assert list(federated_state(plain)) == list(plain.state_dict())


def test_federated_state_is_the_declared_entries_and_loading_leaves_the_rest_as_built() -> None:
    model, other = FrozenBase(), FrozenBase()
    torch.manual_seed(1)
    other.top.reset_parameters()
    state = federated_state(model)
    assert list(state) == ["top.weight", "top.bias"]
    base = model.base.weight.detach().clone()
    load_federated_state(model, {k: v.clone() for k, v in federated_state(other).items()})
    assert torch.equal(model.top.weight, other.top.weight) and torch.equal(model.top.bias, other.top.bias)
    assert torch.equal(model.base.weight, base), "the frozen base stays as built"
    # dtypes are the model's own (a float64 global from FedAdam is cast on load)
    load_federated_state(model, {k: v.double() for k, v in state.items()})
    assert model.top.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s.pop("top.bias"), r"missing \['top.bias'\]"),
        (lambda s: s.update({"base.weight": torch.zeros(5, 6)}), r"unknown \['base.weight'\]"),
        (lambda s: s.update({"top.weight": torch.zeros(3, 4)}), r"'top.weight' has shape \(3, 4\).*\(3, 5\)"),
    ],
    ids=["missing", "unknown", "shape"],
)
def test_load_federated_state_is_strict_in_one_line(change, problem: str) -> None:
    model = FrozenBase()
    state = {k: v.clone() for k, v in federated_state(model).items()}
    change(state)
    with pytest.raises(ValueError, match=problem) as raised:
        load_federated_state(model, state)
    assert "\n" not in str(raised.value)


def test_federated_names_outside_the_state_dict_are_a_bug_named_in_one_line() -> None:
    class Wrong(FrozenBase):
        def federated_names(self) -> tuple[str, ...]:
            return ("top.weight", "head.weight")

    with pytest.raises(ValueError, match=r"names \['head.weight'\], not the state-dict entries"):
        federated_state(Wrong())


def test_the_auditor_sees_a_zero_update_for_parameters_outside_the_federated_model() -> None:
    model = FrozenBase()
    before = {k: v.clone() for k, v in federated_state(model).items()}
    after = {k: v + 0.5 for k, v in before.items()}
    seen_before, seen_after = weights_around(model, before, after)
    assert list(seen_before) == [n for n, _ in model.named_parameters()]
    assert torch.equal(seen_before["base.weight"], seen_after["base.weight"])
    assert torch.equal(seen_after["top.weight"], after["top.weight"])


def test_a_round_scheduled_family_without_run_settings_says_so() -> None:
    model = build_model("ulmfit", InputSpec.tokens(12, 40, 3), embedding=8, hidden=16, classifier_hidden=6)
    with pytest.raises(ValueError, match="knows no run length"):
        model.sent_names(1)


# --- a ULMFiT client and the server ------------------------------------------------------------
ULMFIT = RunConfig(
    model="ulmfit", dataset="fortunes", num_clients=2, rounds=5, local_epochs=1, max_local_steps=2,
    batch_size=8, learning_rate=0.05,
    model_options="lm_rounds=0,embedding=8,hidden=16,classifier_hidden=6",
)  # fmt: skip


def _client_reply(
    config: RunConfig,
    server_round: int,
    weights: dict[str, np.ndarray],
    partition: int,
    clipping_norm: float | None = None,
) -> Message:
    """A real train reply of fedsim's ClientApp to the message FedAvg builds for this round (with
    `clipping_norm`: as Flower's client-side central-DP wrapper asks it)."""
    grid = StaticGrid([100 + p for p in range(config.num_clients)])
    messages = build_strategy(config).configure_train(
        server_round, arrays(weights), wire.run_config_record(config), grid
    )
    message = sorted(messages, key=lambda m: m.metadata.dst_node_id)[partition]
    if clipping_norm is not None:
        message.content.config_records[wire.CONFIG][KEY_CLIPPING_NORM] = clipping_norm
    context = Context(
        run_id=1,
        node_id=message.metadata.dst_node_id,
        node_config={wire.PARTITION_ID: partition, "num-partitions": config.num_clients},
        state=RecordDict(),
        run_config={},
    )
    reply = client_app.build_client_app(share_truth=False)(message, context)
    assert not reply.has_error(), reply.error.reason
    return reply


def _global(config: RunConfig) -> dict[str, np.ndarray]:
    return {name: tensor.numpy().copy() for name, tensor in federated_state(model_for(config)).items()}


def _bytes(record: ArrayRecord) -> int:
    """What the reply's arrays take on the wire: each one's serialised bytes (.npy, header too)."""
    return sum(len(array.data) for array in record.values())


def _chain(config: RunConfig, weights: dict[str, np.ndarray], server_round: int):
    model = model_for(config)
    dtypes = {name: tensor.numpy().dtype for name, tensor in federated_state(model).items()}
    chain = build_chain(config, model=model, settings=training_settings(config), model_dtypes=dtypes)
    assert any(isinstance(link, ReplyCompletion) for link in chain.links())
    grid = StaticGrid([100 + p for p in range(config.num_clients)])
    list(chain.outer.configure_train(server_round, arrays(weights), wire.run_config_record(config), grid))
    return chain, model


def test_a_ulmfit_client_sends_only_its_unfrozen_groups_and_the_server_completes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_fortunes()
    act_as_server(monkeypatch)
    weights = _global(ULMFIT)
    group_of = model_for(ULMFIT).group_of()
    trained = [n for n in weights if group_of.get(n) in {"lstm1", "classifier"}]  # round 2 of 5
    replies = [_client_reply(ULMFIT, 2, weights, p) for p in range(2)]
    for reply in replies:
        record = reply.content.array_records[wire.ARRAYS]
        assert list(record) == trained
        assert sum(a.numpy().nbytes for a in record.values()) == sum(weights[n].nbytes for n in trained)
    assert _bytes(replies[0].content.array_records[wire.ARRAYS]) < _bytes(arrays(weights)) / 5

    chain, _ = _chain(ULMFIT, weights, 2)
    aggregated, _ = chain.outer.aggregate_train(2, replies)
    assert list(aggregated) == list(weights)
    for name, value in weights.items():
        if name not in trained:
            assert np.array_equal(aggregated[name].numpy(), value), f"{name} moved though frozen"
    moved = [n for n in trained if not np.array_equal(aggregated[n].numpy(), weights[n])]
    assert moved, "the unfrozen groups trained and were aggregated"


def test_an_all_unfrozen_round_sends_every_classifier_group_but_not_the_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_fortunes()
    act_as_server(monkeypatch)
    weights = _global(ULMFIT)
    group_of = model_for(ULMFIT).group_of()
    record = _client_reply(ULMFIT, 5, weights, 0).content.array_records[wire.ARRAYS]
    assert list(record) == [n for n in weights if group_of.get(n) != "decoder"]


def test_a_client_asked_to_clip_for_central_dp_replies_with_the_whole_federated_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Flower's clipping mod pairs the reply's arrays with the message's by name and order.
    require_fortunes()
    act_as_server(monkeypatch)
    weights = _global(ULMFIT)
    reply = _client_reply(ULMFIT.replace(central_dp="client"), 2, weights, 0, clipping_norm=1e-3)
    record = reply.content.array_records[wire.ARRAYS]
    assert list(record) == list(weights)
    sent = model_for(ULMFIT).sent_names(2)
    deltas = {n: record[n].numpy().astype(np.float64) - weights[n] for n in weights}
    assert all(not deltas[n].any() for n in weights if n not in sent), "frozen entries: zero update"
    norm = float(np.sqrt(sum(np.square(d).sum() for d in deltas.values())))
    assert 0 < norm <= 1e-3 * (1 + 1e-4), "the mod clipped the update of the sent entries"


@pytest.mark.parametrize("mistake", ["one short", "one more"])
def test_a_reply_of_any_other_key_set_is_still_rejected(
    mistake: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    require_fortunes()
    act_as_server(monkeypatch)
    weights = _global(ULMFIT)
    model = model_for(ULMFIT)
    sent = model.sent_names(2)
    good = {n: weights[n] + 0.01 for n in sent}
    if mistake == "one short":
        bad = {n: weights[n] + 1.0 for n in sent[1:]}
    else:
        extra = next(n for n in weights if n not in sent)
        bad = {**{n: weights[n] + 1.0 for n in sent}, extra: weights[extra] + 1.0}
    chain, _ = _chain(ULMFIT, weights, 2)
    with caplog.at_level(logging.WARNING):
        aggregated, _ = chain.outer.aggregate_train(2, [train_reply(0, good), train_reply(1, bad)])
    assert "rejected the update of client 1: array names differ from the global model's" in caplog.text
    for name, value in weights.items():
        expected = good[name] if name in sent else value
        assert np.array_equal(aggregated[name].numpy(), expected.astype(value.dtype)), name

    chain, _ = _chain(ULMFIT, weights, 2)
    with pytest.raises(RunFailedError, match="no usable update"):
        chain.outer.aggregate_train(2, [train_reply(1, bad)])


def test_defences_clip_and_noise_only_what_is_sent() -> None:
    require_fortunes()
    config = ULMFIT.replace(defence="gaussian", noise_std=0.5)
    model = model_for(config)
    load_federated_state(model, {k: torch.from_numpy(v) for k, v in _global(config).items()})
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_locally(model, client_data(config, 0), config, server_round=2, partition_id=0)
    assert list(result.weights) == list(model.sent_names(2))
    for name, value in model.state_dict().items():
        unchanged = torch.equal(value, start[name])
        assert unchanged == (name not in result.weights), f"{name}: noised though not sent, or not trained"


def test_secagg_refuses_a_model_that_sends_part_of_its_federated_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = RunConfig(model="random-features", num_clients=3, rounds=3, secagg=True)
    spec = InputSpec.image((1, 8, 8), 10)
    check_secagg_model(config, spec)  # the readout is sent whole every round: fine
    monkeypatch.setattr(
        RandomFeatures, "sent_names", lambda self, r: self.federated_names()[: 1 if r == 2 else 2]
    )
    with pytest.raises(UserInputError, match=r"in round 2 its clients send only part of its federated model"):
        check_secagg_model(config, spec)


# --- a model whose federated model is its readout --------------------------------------------
def test_random_features_federate_the_readout_only_and_rebuild_the_same_base() -> None:
    spec = InputSpec.image((1, 8, 8), 10)
    torch.manual_seed(0)
    first = build_model("random-features", spec, features=32)
    torch.manual_seed(1)  # the run seed differs; the frozen layer comes from feature_seed alone
    second = build_model("random-features", spec, features=32)
    assert torch.equal(first.projection, second.projection) and torch.equal(first.offset, second.offset)
    assert not torch.equal(first.readout.weight, second.readout.weight)
    other = build_model("random-features", spec, features=32, feature_seed=1)
    assert not torch.equal(first.projection, other.projection)
    assert list(federated_state(first)) == ["readout.weight", "readout.bias"]
    assert set(first.state_dict()) == {"projection", "offset", "readout.weight", "readout.bias"}
    with pytest.raises(ValueError, match="features must be at least 1"):
        build_model("random-features", spec, features=0)


def test_resume_reads_a_federated_checkpoint_and_refuses_a_whole_state_dict(tmp_path: Path) -> None:
    config = RunConfig(name="rf", model="random-features", num_clients=2, rounds=3)
    store = RunStore.create(tmp_path / "runs", config, ("accuracy",))
    model = model_for(config)
    store.append_rows([{"round": 0, "stage": "server", "eval_loss": 1.0, "eval_accuracy": 0.1,
                        "num_examples": 360, "seconds": 0.1}])  # fmt: skip
    store.save_checkpoint(0, federated_state(model), {})
    assert open_for_resume(store.path).last_complete_round() == 0
    whole = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(whole, store.path / "checkpoints" / "round-0000.safetensors")
    with pytest.raises(UserInputError, match="unexpected"):
        open_for_resume(store.path)
