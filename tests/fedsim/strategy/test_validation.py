"""Reply validation: one bad client must not reach the auditor or the aggregator, and a round
or a global model that cannot be trusted stops the run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError, UserInputError
from fedsim.strategy.aggregators import build_strategy, check_strategy
from fedsim.strategy.validation import (
    DIVERGED,
    ValidatingStrategy,
    require_finite_model,
    screen_train_replies,
)
from tests.support.flower_messages import StaticGrid, act_as_server, arrays, train_reply

GLOBAL = {
    "w": np.arange(6, dtype=np.float32).reshape(3, 2),
    "b": np.zeros(2, dtype=np.float32),
}


@pytest.fixture(autouse=True)
def _server(monkeypatch: pytest.MonkeyPatch) -> None:
    act_as_server(monkeypatch)


def moved(step: float) -> dict[str, np.ndarray]:
    """The global weights moved by `step` in every coordinate (‖Δw‖ = step·√8)."""
    return {name: value + np.float32(step) for name, value in GLOBAL.items()}


def round_with(bad: dict[str, np.ndarray] | None, **reply_options: object) -> list[Message]:
    """Clients 0 and 2 send honest updates; client 1 sends `bad`."""
    return [
        train_reply(0, moved(0.1)),
        train_reply(1, bad, **reply_options),
        train_reply(2, moved(0.3)),
    ]


def kept_partitions(replies: list[Message]) -> list[int]:
    return [int(r.content.config_records[wire.CLIENT][wire.PARTITION_ID]) for r in replies]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({**moved(0.2), "w": np.full((3, 2), np.nan, np.float32)}, "non-finite weights in 'w'"),
        ({**moved(0.2), "b": np.array([1.0, np.inf], np.float32)}, "non-finite weights in 'b'"),
        (
            {**moved(0.2), "w": np.zeros((2, 3), np.float32)},
            "array 'w' has shape (2, 3), the model's is (3, 2)",
        ),
        (
            {**moved(0.2), "w": np.zeros((3, 2), np.int32)},
            "array 'w' has dtype int32, the model's is float32",
        ),
        ({"w": moved(0.2)["w"]}, "array names differ from the global model's (missing ['b'], extra [])"),
        ({**moved(0.2), "x": np.zeros(1, np.float32)}, "(missing [], extra ['x'])"),
        (None, "expected one ArrayRecord 'arrays', got []"),
    ],
    ids=["nan", "inf", "shape", "dtype", "missing-name", "extra-name", "no-arrays"],
)
def test_a_malformed_update_is_rejected_and_the_others_kept(
    bad: dict[str, np.ndarray] | None, reason: str
) -> None:
    kept, rejections = screen_train_replies(round_with(bad), GLOBAL)
    assert kept_partitions(kept) == [0, 2]
    assert [r.client for r in rejections] == ["client 1"]
    assert reason in rejections[0].reason
    assert rejections[0].diverged == ("non-finite" in reason)


def test_an_honest_round_is_kept_whole_and_float64_globals_accept_float32_updates() -> None:
    """FedAdam's global model is float64; clients answer in float32."""
    global64 = {name: value.astype(np.float64) for name, value in GLOBAL.items()}
    model_dtypes = {name: value.dtype for name, value in GLOBAL.items()}
    kept, rejections = screen_train_replies(round_with(moved(0.2)), global64, 3, model_dtypes)
    assert kept_partitions(kept) == [0, 1, 2] and rejections == []


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_an_update_in_another_float_type_is_rejected(dtype: type) -> None:
    """A float64 reply would turn the aggregate and its checkpoint into float64; float16 loses
    precision silently."""
    bad = {name: value.astype(dtype) for name, value in moved(0.2).items()}
    kept, rejections = screen_train_replies(round_with(bad), GLOBAL)
    assert kept_partitions(kept) == [0, 2]
    assert f"has dtype {np.dtype(dtype)}, the model's is float32" in rejections[0].reason


def test_an_unreadable_array_is_rejected_not_raised() -> None:
    replies = round_with(moved(0.2))
    replies[1].content[wire.ARRAYS]["w"].data = b""  # reading it raises EOFError, not ValueError
    kept, rejections = screen_train_replies(replies, GLOBAL)
    assert kept_partitions(kept) == [0, 2] and "array 'w' is unreadable" in rejections[0].reason


@pytest.mark.parametrize(
    ("num_examples", "reason"),
    [(0, "num-examples is 0, not a positive number"), (math.nan, "num-examples is nan")],
)
def test_a_reply_without_a_usable_weight_is_rejected(num_examples: float, reason: str) -> None:
    kept, rejections = screen_train_replies(round_with(moved(0.2), num_examples=num_examples), GLOBAL)
    assert kept_partitions(kept) == [0, 2] and reason in rejections[0].reason


def test_a_reply_without_metrics_is_rejected() -> None:
    replies = round_with(moved(0.2))
    del replies[1].content.metric_records[wire.METRICS]
    kept, rejections = screen_train_replies(replies, GLOBAL)
    assert kept_partitions(kept) == [0, 2]
    assert rejections[0].reason == "expected one MetricRecord 'metrics', got []"


def test_metrics_unlike_the_other_clients_are_rejected() -> None:
    """Flower's aggregation needs one set of metric names; it raised on a mismatch."""
    kept, rejections = screen_train_replies(round_with(moved(0.2), metrics={"extra": 1.0}), GLOBAL)
    assert kept_partitions(kept) == [0, 2]
    assert "metrics ['extra', 'num-examples'] differ" in rejections[0].reason


def test_norm_outliers_are_rejected_only_when_configured() -> None:
    huge = round_with(moved(1e6))
    kept, rejections = screen_train_replies(huge, GLOBAL, reject_norm_ratio=10)
    assert kept_partitions(kept) == [0, 2]
    assert "exceeds 10 × the round's median" in rejections[0].reason
    assert not rejections[0].diverged
    kept, rejections = screen_train_replies(huge, GLOBAL, reject_norm_ratio=0)
    assert kept_partitions(kept) == [0, 1, 2] and rejections == []
    # 0.3 is 1.5 × the median 0.2: kept at ratio 2, rejected at ratio 1.4.
    assert len(screen_train_replies(round_with(moved(0.2)), GLOBAL, reject_norm_ratio=2)[1]) == 0
    assert len(screen_train_replies(round_with(moved(0.2)), GLOBAL, reject_norm_ratio=1.4)[1]) == 1


def test_failed_clients_pass_through_to_the_strategy() -> None:
    replies = round_with(moved(0.2))
    replies[1] = Message(
        Error(0, "boom"), reply_to=Message(RecordDict(), dst_node_id=9, message_type="train")
    )
    kept, rejections = screen_train_replies(replies, GLOBAL, reject_norm_ratio=10)
    assert len(kept) == 3 and kept[1].has_error() and rejections == []


def _validated_fedavg(replies: list[Message], reject_norm_ratio: float = 0.0) -> ArrayRecord | None:
    strategy = ValidatingStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), reject_norm_ratio)
    list(strategy.configure_train(1, arrays(GLOBAL), wire.run_config_record(RunConfig()), StaticGrid([1])))
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated


def test_the_aggregate_of_a_round_with_one_nan_client_is_the_honest_clients_mean() -> None:
    poisoned = round_with({**moved(0.2), "w": np.full((3, 2), np.nan, np.float32)})
    unvalidated, _ = FedAvg().aggregate_train(1, poisoned)
    assert np.isnan(unvalidated["w"].numpy()).all(), "the poison this wrapper exists for"
    aggregated = _validated_fedavg(poisoned)
    assert np.allclose(aggregated["w"].numpy(), GLOBAL["w"] + 0.2)
    assert np.allclose(aggregated["b"].numpy(), 0.2)


def test_a_round_with_only_diverged_updates_stops_and_names_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nan = {**moved(0.2), "w": np.full((3, 2), np.nan, np.float32)}
    with pytest.raises(RunFailedError) as caught:
        _validated_fedavg([train_reply(0, nan), train_reply(1, nan)])
    message = str(caught.value)
    assert message == (
        "round 1: no usable update from 2 clients (0 failed to train, 2 rejected; first rejected "
        f"client 0: non-finite weights in 'w'); {DIVERGED}"
    )
    assert "\n" not in message and "--learning-rate" in message
    assert "round 1: rejected the update of client 1: non-finite weights in 'w'" in caplog.text


def test_a_round_with_only_rejected_shapes_stops_without_blaming_the_learning_rate() -> None:
    with pytest.raises(RunFailedError) as caught:
        _validated_fedavg([train_reply(0, {"w": GLOBAL["w"]})])
    assert "1 rejected; first rejected client 0: array names differ" in str(caught.value)
    assert "learning rate" not in str(caught.value)


class _Diverging:
    """An aggregator whose result overflowed, as a too-high server learning rate makes it."""

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        values = {name: np.full_like(value, np.inf) for name, value in GLOBAL.items()}
        return arrays(values), MetricRecord({})


def test_a_non_finite_global_model_stops_the_run() -> None:
    strategy = ValidatingStrategy(_Diverging())
    strategy.configure_train(3, arrays(GLOBAL), wire.run_config_record(RunConfig()), StaticGrid([1]))
    with pytest.raises(RunFailedError) as caught:
        strategy.aggregate_train(3, round_with(moved(0.2)))
    assert str(caught.value) == (
        f"round 3: the aggregated global model has non-finite weights in 'w'; {DIVERGED}"
    )
    require_finite_model(3, arrays(GLOBAL))  # a finite model passes
    require_finite_model(3, None)  # so does a round that aggregated nothing


def test_the_evaluation_of_a_client_without_metrics_is_dropped_not_fatal() -> None:
    replies = [train_reply(p, None, metrics={wire.EVAL_LOSS: 0.5 + p}) for p in (0, 1)]
    del replies[1].content.metric_records[wire.METRICS]
    with pytest.raises(Exception, match="Expected exactly one MetricRecord"):
        FedAvg().aggregate_evaluate(1, replies)
    assert ValidatingStrategy(FedAvg()).aggregate_evaluate(1, replies)[wire.EVAL_LOSS] == 0.5


@pytest.mark.parametrize("ratio", [-1.0, 0.5, 1.0, math.inf, math.nan])
def test_reject_norm_ratio_must_be_off_or_finite(ratio: float) -> None:
    with pytest.raises(UserInputError, match="reject-norm-ratio must be 0"):
        check_strategy(RunConfig(reject_norm_ratio=ratio))
    check_strategy(RunConfig(reject_norm_ratio=10.0))
    assert build_strategy(RunConfig()).weighted_by_key == wire.NUM_EXAMPLES
