"""Central DP in the strategy chain: Flower's wrappers around the plain aggregator, its accountant's
ε in privacy.csv, equal client weights, seeded noise, and exact resume of the accountant."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from opacus.accountants import RDPAccountant

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError
from fedsim.strategy.auditor.strategy import AuditingStrategy
from fedsim.strategy.central_dp import CentralPrivacy
from fedsim.strategy.chain import StrategyChain, build_chain, checkpoint_state_shapes
from fedsim.strategy.ordering import ReproducibleStrategy
from fedsim.strategy.privacy_ledger import PRIVACY_FILE, PrivacyLedger
from fedsim.strategy.validation import ValidatingStrategy
from fedsim.training.transforms import PrivacySpend
from tests.support.flower_messages import StaticGrid, act_as_server, arrays, train_reply
from tests.support.strategies import Counting, flower_epsilon

GLOBAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), "b": np.ones(2, np.float32)}
DTYPES = {name: np.dtype(np.float32) for name in GLOBAL}
CENTRAL = RunConfig(num_clients=2, central_dp="server", noise_multiplier=0.8, clipping_norm=0.5, seed=4)


@pytest.fixture(autouse=True)
def _server(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)


def play_round(
    chain: StrategyChain,
    server_round: int,
    weights: dict[str, np.ndarray],
    seed: int,
    clients: tuple[int, ...] = (0, 1),
    scale: float = 1.0,
    spends: dict[int, PrivacySpend] | None = None,
) -> dict[str, np.ndarray] | None:
    """One round: each client in `clients` replies with weights + N(0, scale²) (and a DP-SGD spend)."""
    record = wire.run_config_record(RunConfig())
    list(
        chain.outer.configure_train(
            server_round, arrays(weights), record, StaticGrid([100 + p for p in (0, 1)])
        )
    )
    rng = np.random.default_rng(seed)
    replies = []
    for p in clients:
        update = {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in weights.items()}
        reply = train_reply(p, update, num_examples=10 * (p + 1))  # unequal counts on purpose
        if spends and p in spends:
            reply.content[wire.PRIVACY] = wire.encode_privacy(("dp-sgd(z=1.1,C=1)",), (spends[p],))
        replies.append(reply)
    aggregated, _ = chain.outer.aggregate_train(server_round, replies)
    return None if aggregated is None else {name: array.numpy() for name, array in aggregated.items()}


def privacy_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / PRIVACY_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_central_dp_sits_directly_around_the_plain_aggregator(tmp_path: Path) -> None:
    chain = build_chain(CENTRAL.replace(audit=True), audit=Counting, output_dir=tmp_path)
    kinds = [type(link) for link in chain.links()]
    assert kinds == [ReproducibleStrategy, ValidatingStrategy, PrivacyLedger, Counting, CentralPrivacy]
    central = chain.find(CentralPrivacy)
    assert type(central.inner) is DifferentialPrivacyServerSideFixedClipping
    assert central.inner.strategy is chain.aggregator and type(chain.aggregator) is FedAvg
    assert chain.aggregator.weighted_by_key == wire.DP_WEIGHT
    adaptive = build_chain(
        CENTRAL.replace(central_dp="client", adaptive_clipping=True, noise_multiplier=0.1),
        output_dir=tmp_path,
    )
    assert type(adaptive.find(CentralPrivacy).inner) is DifferentialPrivacyClientSideAdaptiveClipping
    assert adaptive.find(CentralPrivacy).accountant is None


def test_epsilon_per_round_equals_flowers_accountant_and_the_server_row(tmp_path: Path) -> None:
    chain = build_chain(CENTRAL, model_dtypes=DTYPES, output_dir=tmp_path)
    weights = GLOBAL
    for server_round in (1, 2, 3):
        weights = play_round(chain, server_round, weights, seed=server_round)
    rows = privacy_rows(tmp_path)
    assert [(r["round"], r["partition_id"], r["mechanism"]) for r in rows] == [
        (str(n), "", "central-dp(server)") for n in (1, 2, 3)
    ]
    for releases, row in enumerate(rows, start=1):
        assert float(row["epsilon"]) == pytest.approx(flower_epsilon(CENTRAL, releases), rel=1e-12)
        assert (row["sampling"], float(row["noise_multiplier"]), int(row["steps"])) == (
            "no-amplification", 0.8, releases,
        )  # fmt: skip
    assert chain.find(CentralPrivacy).epsilon() == pytest.approx(flower_epsilon(CENTRAL, 3), rel=1e-12)


def test_updates_are_clipped_weighted_equally_and_noised_reproducibly(tmp_path: Path) -> None:
    quiet = CENTRAL.replace(noise_multiplier=1e-6)
    chain = build_chain(quiet, model_dtypes=DTYPES, output_dir=tmp_path)
    aggregated = play_round(chain, 1, GLOBAL, seed=0, scale=100.0)  # updates far above the norm
    update = np.sqrt(sum(((aggregated[k] - GLOBAL[k]) ** 2).sum() for k in GLOBAL))
    assert update <= quiet.clipping_norm + 1e-3, "the mean of clipped updates must be within C"
    # Equal weights: the aggregate is the plain mean of the two clipped updates, not 1:2 by examples.
    rng = np.random.default_rng(0)
    raw = [
        {k: v + rng.normal(0, 100.0, v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in (0, 1)
    ]
    clipped = []
    for update_of in raw:
        delta = {k: update_of[k] - GLOBAL[k] for k in GLOBAL}
        norm = np.sqrt(sum((d**2).sum() for d in delta.values()))
        clipped.append({k: d * min(1.0, quiet.clipping_norm / norm) for k, d in delta.items()})
    for k in GLOBAL:
        assert np.allclose(aggregated[k], GLOBAL[k] + (clipped[0][k] + clipped[1][k]) / 2, atol=1e-4)

    for folder in (tmp_path / "0", tmp_path / "1"):
        folder.mkdir()
    noisy = [build_chain(CENTRAL, model_dtypes=DTYPES, output_dir=tmp_path / str(i)) for i in (0, 1)]
    first, second = (play_round(c, 1, GLOBAL, seed=5) for c in noisy)
    assert all(np.array_equal(first[k], second[k]) for k in GLOBAL), "the noise must follow the run seed"
    other = build_chain(CENTRAL.replace(seed=5), model_dtypes=DTYPES, output_dir=tmp_path / "0")
    assert not np.array_equal(play_round(other, 1, GLOBAL, seed=5)["w"], first["w"])


def test_a_resumed_chain_reports_the_same_epsilon_and_weights(tmp_path: Path) -> None:
    spends = {p: PrivacySpend("dp-sgd", 0.5, 1e-5, 1.1, 1.0, 0.05, 20, "poisson") for p in (0, 1)}
    config = CENTRAL.replace(defence="dp-sgd")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = build_chain(config, model_dtypes=DTYPES, output_dir=tmp_path / "a")
    after_one = play_round(straight, 1, GLOBAL, seed=1, spends=spends)
    state = straight.state_dict()
    expected_keys = checkpoint_state_shapes(config, {k: v.shape for k, v in GLOBAL.items()}, 1)
    assert set(state) == set(expected_keys) == {
        "central-dp/clipping-norm", "central-dp/accountant", "privacy-ledger/history",
    }  # fmt: skip
    expected = play_round(straight, 2, after_one, seed=2, spends=spends)

    resumed = build_chain(config, round_offset=1, model_dtypes=DTYPES, output_dir=tmp_path / "b")
    resumed.load_state_dict({key: np.array(value) for key, value in state.items()})
    got = play_round(resumed, 1, after_one, seed=2, spends=spends)  # round 1 of this invocation is 2
    assert all(np.array_equal(expected[k], got[k]) for k in GLOBAL), "resumed central DP drifted"
    assert resumed.find(CentralPrivacy).epsilon() == straight.find(CentralPrivacy).epsilon()
    assert (
        resumed.find(PrivacyLedger).max_client_epsilon() == straight.find(PrivacyLedger).max_client_epsilon()
    )

    fresh = build_chain(config, round_offset=1, model_dtypes=DTYPES, output_dir=tmp_path / "b")
    play_round(fresh, 1, after_one, seed=2, spends=spends)
    assert fresh.find(CentralPrivacy).epsilon() < straight.find(CentralPrivacy).epsilon(), "state mattered"


def test_the_ledger_composes_each_clients_dp_sgd_rounds_with_opacus(tmp_path: Path) -> None:
    config = RunConfig(num_clients=2, defence="dp-sgd", target_delta=1e-5)
    chain = build_chain(config, model_dtypes=DTYPES, output_dir=tmp_path)
    weights = GLOBAL
    history = {0: [], 1: []}
    for server_round in (1, 2, 3):
        spends = {
            p: PrivacySpend(
                "dp-sgd", 0.3 + p, 1e-5, 1.0 + p / 2, 1.0, 0.02 * (p + 1), 10 * server_round, "shuffle"
            )
            for p in (0, 1)
        }
        weights = play_round(chain, server_round, weights, seed=server_round, spends=spends)
        for p, spend in spends.items():
            history[p].append((spend.noise_multiplier, spend.sample_rate, spend.steps))
    rows = [r for r in privacy_rows(tmp_path) if r["round"] == "3"]
    for row in rows:
        accountant = RDPAccountant()
        accountant.history = history[int(row["partition_id"])]
        assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
        assert row["sampling"] == "shuffle" and row["mechanism"] == "dp-sgd"
    assert float(rows[1]["epsilon_round"]) == 1.3  # as the client reported it
    assert chain.find(PrivacyLedger).max_client_epsilon() == max(float(r["epsilon"]) for r in rows)


def test_a_round_missing_a_sampled_client_is_skipped_at_no_cost(tmp_path: Path) -> None:
    chain = build_chain(CENTRAL, model_dtypes=DTYPES, output_dir=tmp_path)
    assert play_round(chain, 1, GLOBAL, seed=1, clients=(0,)) is None
    central = chain.find(CentralPrivacy)
    assert central.skipped_rounds == [1] and central.epsilon() == 0
    assert privacy_rows(tmp_path) == []


def test_audit_rows_name_central_dp_and_where_it_acts(tmp_path: Path) -> None:
    from fedsim.strategy.auditor.strategy import auditing_wrapper

    for where, label in (
        ("server", "central-dp(server,z=0.8,C=0.5):after-view"),
        ("client", "central-dp(client,z=0.8,C=0.5):clipped-before-view"),
    ):
        config = CENTRAL.replace(central_dp=where, audit=True)
        chain = build_chain(config, audit=auditing_wrapper(config, tmp_path), output_dir=tmp_path)
        assert chain.find(AuditingStrategy).server_defences == label


def test_a_run_killed_in_round_1_resumes_from_its_round_0_ledger_and_accountant(tmp_path: Path) -> None:
    """Round 0's checkpoint already holds central DP's and the ledger's (empty) state; a run killed
    before round 1 completed must resume from it, and a later round's file must hold it too."""
    from fedsim.plan.resume import open_for_resume
    from fedsim.store.run_store import RunStore
    from fedsim.training.local import model_for

    config = CENTRAL.replace(name="killed", defence="dp-sgd")
    store = RunStore.create(tmp_path, config, ("accuracy",))
    chain = build_chain(config, model_dtypes=DTYPES, output_dir=store.path)
    store.save_checkpoint(0, model_for(config).state_dict(), chain.state_dict())
    assert open_for_resume(store.path).last_complete_round() == 0
    store.save_checkpoint(1, model_for(config).state_dict(), {})  # a round-1 file without the state
    with pytest.raises(UserInputError, match="does not hold the fedavg strategy's state"):
        open_for_resume(store.path)
