"""The strategy chain: built in its documented order, and each part's state saved and restored
for resume (FedAdam's server moments included), bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.store.run_store import RunStore
from fedsim.strategy.chain import StrategyChain, build_chain
from fedsim.strategy.ordering import ReproducibleStrategy
from fedsim.strategy.validation import ValidatingStrategy
from tests.support.flower_messages import StaticGrid, act_as_server, arrays, train_reply
from tests.support.strategies import Counting

GLOBAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), "b": np.ones(2, np.float32)}


@pytest.fixture(autouse=True)
def _server(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)


def test_the_chain_runs_in_its_documented_order() -> None:
    chain = build_chain(RunConfig(audit=True), audit=Counting)
    kinds = [type(link) for link in chain.links()]
    assert kinds == [ReproducibleStrategy, ValidatingStrategy, Counting]
    assert chain.links()[-1].inner is chain.aggregator
    assert type(chain.aggregator) is FedAvg, "Flower's DP wrappers need the plain aggregator inside"
    assert [type(link) for link in build_chain(RunConfig()).links()] == kinds[:2]
    with pytest.raises(ValueError, match="no audit wrapper"):
        build_chain(RunConfig(audit=True))


# The clients' model is float32; FedAdam's global turns float64 after its first round.
DTYPES = {name: np.dtype(np.float32) for name in GLOBAL}


def play_round(chain: StrategyChain, server_round: int, weights: dict[str, np.ndarray], seed: int):
    """Configure and aggregate one round with two clients' replies drawn from `seed`."""
    record = wire.run_config_record(RunConfig())
    list(chain.outer.configure_train(server_round, arrays(weights), record, StaticGrid([101, 102])))
    rng = np.random.default_rng(seed)
    replies: list[Message] = [
        train_reply(p, {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in weights.items()})
        for p in (0, 1)
    ]
    aggregated, _ = chain.outer.aggregate_train(server_round, replies)
    return {name: array.numpy() for name, array in aggregated.items()}


def test_a_restored_fedadam_chain_continues_exactly_like_an_uninterrupted_one() -> None:
    config = RunConfig(strategy="fedadam", num_clients=2, audit=True)
    straight = build_chain(config, audit=Counting, model_dtypes=DTYPES)
    after_one = play_round(straight, 1, GLOBAL, seed=1)
    state = straight.state_dict()
    assert sorted(state) == [
        "Counting/rounds", "aggregator/m_t/b", "aggregator/m_t/w", "aggregator/v_t/b", "aggregator/v_t/w",
    ]  # fmt: skip

    resumed = build_chain(config, round_offset=1, audit=Counting, model_dtypes=DTYPES)
    resumed.load_state_dict({key: np.array(value) for key, value in state.items()})
    assert resumed.find(Counting).rounds == 1
    assert isinstance(resumed.aggregator, FedAdam)
    expected = play_round(straight, 2, after_one, seed=2)
    got = play_round(resumed, 1, after_one, seed=2)  # round 1 of this invocation is round 2
    assert all(np.array_equal(expected[k], got[k]) for k in expected), "resumed FedAdam drifted"

    fresh = play_round(
        build_chain(config, round_offset=1, audit=Counting, model_dtypes=DTYPES), 1, after_one, seed=2
    )
    assert not all(np.array_equal(expected[k], fresh[k]) for k in expected), "moments made no difference"


def test_state_for_a_part_the_chain_lacks_is_refused() -> None:
    chain = build_chain(RunConfig(strategy="fedavg"))
    assert chain.state_dict() == {}
    with pytest.raises(ValueError, match="belongs to no part of this chain"):
        chain.load_state_dict({"Counting/rounds": np.array(1)})
    with pytest.raises(ValueError, match="FedAvg keeps no state"):
        chain.load_state_dict({"aggregator/m_t/w": GLOBAL["w"]})
    with pytest.raises(ValueError, match="ValidatingStrategy keeps no state"):
        chain.load_state_dict({"ValidatingStrategy/x": GLOBAL["w"]})


def test_the_chain_state_survives_the_run_store_checkpoint(tmp_path: Path) -> None:
    config = RunConfig(strategy="fedadam", num_clients=2)
    chain = build_chain(config)
    play_round(chain, 1, GLOBAL, seed=3)
    store = RunStore.create(tmp_path, config, ("accuracy",))
    store.save_checkpoint(1, {k: torch.from_numpy(v) for k, v in GLOBAL.items()}, chain.state_dict())
    _, saved = store.load_checkpoint(1)
    restored = build_chain(config, round_offset=1)
    restored.load_state_dict(saved)
    for moment in ("m_t", "v_t"):
        original, loaded = getattr(chain.aggregator, moment), getattr(restored.aggregator, moment)
        assert original.keys() == loaded.keys()
        assert all(
            np.array_equal(original[k], loaded[k]) and original[k].dtype == loaded[k].dtype for k in original
        )
