"""A node's own config says what it holds: bad or missing keys are one clear line each, and a
node never silently trains on partition 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data, dataset_for
from fedsim.errors import UserInputError
from fedsim.federation import client_app
from fedsim.federation.node_config import (
    DATA_PATH,
    NUM_PARTITIONS,
    load_node_data,
    node_data_for_run,
    read_node_config,
)
from fedsim.federation.secagg_client import SecAggClient
from tests.support.flower_messages import act_as_server, train_messages

RUN = RunConfig(num_clients=2, local_epochs=1, max_local_steps=1, batch_size=4)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "this node has no partition-id in its node config; start it with flower-supernode "),
        ({NUM_PARTITIONS: 2}, "this node has no partition-id"),
        ({wire.PARTITION_ID: "abc"}, "node config partition-id='abc' is not an integer; set e.g. "),
        ({wire.PARTITION_ID: 1.5}, "node config partition-id=1.5 is not an integer"),
        ({wire.PARTITION_ID: True}, "node config partition-id=True is not an integer"),
        ({wire.PARTITION_ID: -1}, "node config partition-id=-1 is negative; set a value of 0 or more"),
        ({wire.PARTITION_ID: 0, NUM_PARTITIONS: "two"}, "node config num-partitions='two' is not an "
            "integer; set e.g. num-partitions=2"),
        ({wire.PARTITION_ID: 0, NUM_PARTITIONS: 0}, "node config num-partitions=0; set the federation's"),
        (
            {wire.PARTITION_ID: 2, NUM_PARTITIONS: 2},
            "node config partition-id=2 is not below num-partitions=2; partition ids run 0 .. 1",
        ),
        ({wire.PARTITION_ID: 0, DATA_PATH: 5}, "node config data-path=5 is not a file path; quote it"),
        ({wire.PARTITION_ID: 0, DATA_PATH: " "}, "node config data-path=' ' is not a file path"),
        ({wire.PARTITION_ID: 0, DATA_PATH: "/d/n.csv"}, "node config data-path='/d/n.csv' must name a .npz"),
        ({wire.PARTITION_ID: 0, DATA_PATH: "/no/n.npz"}, "node config data-path='/no/n.npz': no such file"),
    ],
    ids=[
        "missing", "only-num-partitions", "non-integer", "float", "bool", "negative",
        "num-partitions-non-integer", "num-partitions-zero", "id-not-below-count", "path-not-string",
        "path-blank", "path-not-npz", "path-missing",
    ],
)  # fmt: skip
def test_bad_node_config_is_one_clear_line(node_config: dict[str, object], message: str) -> None:
    with pytest.raises(UserInputError) as caught:
        read_node_config(node_config)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        (
            {wire.PARTITION_ID: 0, NUM_PARTITIONS: 3},
            "node config num-partitions=3 but the run has clients=2; start the node with "
            "num-partitions=2 or run with -c clients=3",
        ),
        (
            {wire.PARTITION_ID: 2},
            "node config partition-id=2 but the run has clients=2; partition ids run 0 .. 1",
        ),
    ],
    ids=["count-mismatch", "id-beyond-run"],
)
def test_a_node_that_disagrees_with_the_run_is_refused(node_config: dict[str, object], message: str) -> None:
    with pytest.raises(UserInputError, match="^" + message.replace(".", r"\.") + "$"):
        node_data_for_run(node_config, RUN)


def test_num_partitions_may_be_left_to_the_run() -> None:
    node = node_data_for_run({wire.PARTITION_ID: "1"}, RUN)  # a string value, as some configs give
    assert (node.partition_id, node.num_partitions, node.data_path) == (1, None, None)


def _digits_file(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _good(n: int = 20) -> dict[str, np.ndarray]:
    data = dataset_for(RUN)
    return {"x": data.x_train[:n], "y": data.y_train[:n]}


def _bad_files() -> list[tuple[str, dict[str, np.ndarray], str]]:
    good = _good()
    x, y = good["x"], good["y"]
    return [
        ("extra-array", {**good, "z": y}, "holds arrays ['x', 'y', 'z']; save exactly x and y"),
        ("no-y", {"x": x}, "holds arrays ['x']; save exactly x and y"),
        ("wrong-shape", {"x": x.reshape(len(x), 64), "y": y}, "x must be float32 of shape (N >= 1, 1, 8, 8)"),
        ("float64", {"x": x.astype(np.float64), "y": y}, "x must be float32 of shape (N >= 1, 1, 8, 8)"),
        ("empty", {"x": x[:0], "y": y[:0]}, "x must be float32 of shape (N >= 1, 1, 8, 8)"),
        ("short-y", {"x": x, "y": y[:-1]}, "y must be integer labels of shape (20,), got int64 (19,)"),
        ("float-labels", {"x": x, "y": y.astype(np.float32)}, "y must be integer labels of shape (20,)"),
        ("label-range", {"x": x, "y": y + 10}, "labels must lie in [0, 10) like dataset 'digits'"),
        ("nan", {"x": np.where(x > 0.5, np.nan, x).astype(np.float32), "y": y}, "x holds NaN or Inf"),
        ("value-range", {"x": x * 16, "y": y}, "outside dataset 'digits''s range [0, 1]; scale them"),
        ("object", {"x": np.array([x[0], None], dtype=object), "y": y[:2]}, "is not a readable .npz"),
    ]


@pytest.mark.parametrize(
    ("arrays", "message"), [c[1:] for c in _bad_files()], ids=[c[0] for c in _bad_files()]
)
def test_a_bad_data_path_file_is_one_clear_line(
    arrays: dict[str, np.ndarray], message: str, tmp_path: Path
) -> None:
    path = _digits_file(tmp_path / "node.npz", **arrays)
    with pytest.raises(UserInputError) as caught:
        load_node_data({wire.PARTITION_ID: 0, DATA_PATH: path}, RUN)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"node data-path {path!r}")
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(UserInputError, match=r"is not a readable \.npz of plain arrays"):
        load_node_data({wire.PARTITION_ID: 0, DATA_PATH: str(path)}, RUN)


def test_a_node_trains_on_its_own_file_only(tmp_path: Path) -> None:
    good = _good(30)
    path = _digits_file(tmp_path / "node.npz", **good)
    partition_id, data = load_node_data({wire.PARTITION_ID: 1, DATA_PATH: path}, RUN)
    assert partition_id == 1
    assert (len(data.y_train), len(data.y_val)) == (27, 3)  # LOCAL_VALIDATION_SHARE of 30
    mine = np.concatenate([data.x_train.numpy(), data.x_val.numpy()])
    assert sorted(map(bytes, mine)) == sorted(map(bytes, good["x"]))  # exactly the file's samples


def test_a_partition_slice_is_the_simulation_partition() -> None:
    partition_id, data = load_node_data({wire.PARTITION_ID: 1, NUM_PARTITIONS: 2}, RUN)
    expected = client_data(RUN, 1)
    assert partition_id == 1
    assert np.array_equal(data.x_train.numpy(), expected.x_train.numpy())
    assert len(data.y_train) + len(data.y_val) < len(dataset_for(RUN).y_train)  # a slice, not all


def _context(node_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_the_client_app_refuses_a_node_without_partition_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to train on partition 0; on a deployment every such node would share one slice."""
    act_as_server(monkeypatch)
    message = train_messages(RUN)[0]
    with pytest.raises(UserInputError, match=r"^this node has no partition-id in its node config"):
        client_app.train(message, _context({}))
    with pytest.raises(UserInputError, match=r"^this node has no partition-id"):
        client_app.roster(message, _context({}))
    with pytest.raises(UserInputError, match=r"^this node has no partition-id"):
        SecAggClient({})


def test_the_client_app_trains_a_data_path_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    act_as_server(monkeypatch)
    path = _digits_file(tmp_path / "node.npz", **_good(30))
    message = train_messages(RUN)[0]
    reply = client_app.train(message, _context({wire.PARTITION_ID: 1, DATA_PATH: path}))
    assert reply.content.config_records[wire.CLIENT][wire.PARTITION_ID] == 1
    assert reply.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES] == 4  # one step of batch 4
