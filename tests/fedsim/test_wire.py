"""What client and server exchange: fedsim's config cannot collide with a strategy's keys, and
training samples leave a node only by the node's own opt-in."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.federation import client_app
from tests.support.flower_messages import act_as_server, train_messages


@pytest.fixture(autouse=True)
def _server(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "krum", "fedmedian", "fedtrimmedavg"])
def test_only_fedprox_makes_clients_add_a_proximal_term(strategy: str) -> None:
    # proximal-mu defaults to 0.01: it used to reach every strategy's clients under FedProx's key.
    config = RunConfig(strategy=strategy, num_clients=3, proximal_mu=0.01)
    for message in train_messages(config):
        instructions = wire.read_instructions(message.content)
        assert instructions.proximal_mu == 0.0
        assert instructions.config == config
        assert instructions.server_round == 1


def test_fedprox_clients_train_with_the_configured_mu() -> None:
    config = RunConfig(strategy="fedprox", num_clients=2, proximal_mu=0.25)
    mus = [wire.read_instructions(m.content).proximal_mu for m in train_messages(config)]
    assert mus == [0.25, 0.25]


def test_record_names_come_from_wire_not_from_matching_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Renaming fedsim's records renames them in every strategy's messages too."""
    monkeypatch.setattr(wire, "ARRAYS", "fedsim-arrays")
    monkeypatch.setattr(wire, "CONFIG", "fedsim-config")
    for strategy in ("fedavg", "fedprox", "fedadam"):
        (message, *_) = train_messages(RunConfig(strategy=strategy, num_clients=2))
        assert set(message.content.array_records) == {"fedsim-arrays"}
        assert set(message.content.config_records) == {"fedsim-config"}
        assert wire.read_instructions(message.content).config.strategy == strategy


def _train_reply(app: ClientApp, node_config: dict[str, object], config: RunConfig) -> Message:
    """One real train step of `app` on partition 0, from a message FedAvg built."""
    message = train_messages(config)[0]
    context = Context(
        run_id=1,
        node_id=message.metadata.dst_node_id,
        node_config={wire.PARTITION_ID: 0, "num-partitions": config.num_clients, **node_config},
        state=RecordDict(),
        run_config={},
    )
    reply = app(message, context)
    assert not reply.has_error(), reply.error.reason
    return reply


AUDITING = RunConfig(num_clients=2, local_epochs=1, max_local_steps=1, batch_size=4, audit=True)


@pytest.mark.parametrize(
    "node_config",
    [{}, {wire.AUDIT_TRUTH: False}, {wire.AUDIT_TRUTH: "false"}, {wire.AUDIT_TRUTH: 0}],
    ids=["unset", "false", "false-string", "zero"],
)
def test_a_node_without_opt_in_never_ships_samples(node_config: dict[str, object]) -> None:
    for app in (client_app.app, client_app.build_client_app(share_truth=False)):
        reply = _train_reply(app, node_config, AUDITING)
        assert wire.AUDIT_TRUTH not in reply.content.config_records
        assert set(reply.content.config_records) == {wire.CLIENT}
        assert len(reply.content.array_records[wire.ARRAYS]) > 0  # it did train and reply


@pytest.mark.parametrize(
    ("share_truth", "node_config"),
    [(False, {wire.AUDIT_TRUTH: True}), (False, {wire.AUDIT_TRUTH: "true"}), (True, {})],
    ids=["node-config", "node-config-string", "simulation"],
)
def test_an_opted_in_node_ships_samples_when_the_server_audits(
    share_truth: bool, node_config: dict[str, object]
) -> None:
    app = client_app.build_client_app(share_truth=share_truth)
    reply = _train_reply(app, node_config, AUDITING)
    inputs, labels = wire.decode_truth(reply.content.config_records[wire.AUDIT_TRUTH])
    assert len(inputs) == len(labels) == AUDITING.batch_size  # one step of batch 4

    quiet = _train_reply(app, node_config, AUDITING.replace(audit=False))
    assert wire.AUDIT_TRUTH not in quiet.content.config_records
