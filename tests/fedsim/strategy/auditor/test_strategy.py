"""The auditing strategy wrapper, fed Flower messages directly: it decodes, audits and always lets
the inner strategy aggregate, whatever the replies hold."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from attacks.base import ObservedUpdate, Reconstruction, observe_gradient
from audits.scoring.engine import AUDIT_COLUMNS, NO_TRUTH_NOTE, NON_FINITE_NOTE
from fedsim import wire
from fedsim.config.run_config import RunConfig
from fedsim.strategy.auditor import jobs as audit_jobs
from fedsim.strategy.auditor.aggregate import PER_CLIENT_IMPOSSIBLE, AggregateAuditor
from fedsim.strategy.auditor.jobs import APPROXIMATE_NOTE
from fedsim.strategy.auditor.strategy import (
    AUDIT_FILE,
    GRID_FOLDER,
    AuditingStrategy,
    UpdateAuditor,
    auditing_wrapper,
)
from fedsim.strategy.base import StrategyWrapper
from fedsim.strategy.secagg_fedavg import AggregateRound, ClientResult
from fedsim.training.client_step import ClientTraining, client_step
from fedsim.training.local import model_for
from models import InputSpec, TrainingSettings, ZooModel
from tests.support.audited_replies import LR, PLAIN_SGD, Recorder, digits_mlp, train_reply_of
from tests.support.secagg import audit_rows


class Raises:
    name = "raises"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        raise np.linalg.LinAlgError("SVD did not converge")


def _auditor(tmp_path: Path, attacks: list[object], batch_size: int = 1) -> tuple[AuditingStrategy, Recorder]:
    inner = Recorder()
    strategy = AuditingStrategy(inner, UpdateAuditor(attacks), digits_mlp, PLAIN_SGD, batch_size, tmp_path)
    strategy.configure_train(1, ArrayRecord(digits_mlp().state_dict()), ConfigRecord(), grid=None)
    return strategy, inner


def _rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / AUDIT_FILE, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == AUDIT_COLUMNS
        return list(reader)


def test_a_node_without_the_truth_opt_in_is_attacked_and_its_leakage_marked_unmeasurable(
    tmp_path: Path,
) -> None:
    strategy, inner = _auditor(tmp_path, ["analytic-fc"])
    replies = [train_reply_of(0, 0), train_reply_of(1, 1, truth=False)]
    strategy.aggregate_train(1, replies)
    assert inner.aggregated == [replies]
    shared, private = _rows(tmp_path)
    assert float(shared["psnr"]) >= 60 and shared["label_score"] == "1.0" and shared["note"] == ""
    assert (private["partition_id"], private["status"], private["note"]) == (
        "1",
        "reconstructed",
        NO_TRUTH_NOTE,
    )
    assert private["psnr"] == private["ssim"] == private["label_score"] == private["true_labels"] == ""
    assert private["rank_score"] == shared["rank_score"] == "0.0"  # the metric, once per round
    assert (tmp_path / GRID_FOLDER / "round-0001.png").stat().st_size > 5_000


def test_a_nan_update_and_an_attack_that_raises_never_stop_the_round(tmp_path: Path) -> None:
    strategy, inner = _auditor(tmp_path, [Raises(), "layerwise"])
    replies = [train_reply_of(0, 0, poison=float("nan")), train_reply_of(1, 1)]
    strategy.aggregate_train(1, replies)
    assert inner.aggregated == [replies]
    rows = _rows(tmp_path)
    assert [(r["partition_id"], r["attack"], r["status"]) for r in rows] == [
        ("0", "raises", "declined"),
        ("0", "layerwise", "declined"),
        ("1", "raises", "failed"),
        ("1", "layerwise", "reconstructed"),
    ]
    assert rows[0]["note"] == rows[1]["note"] == NON_FINITE_NOTE
    assert rows[2]["note"] == "LinAlgError: SVD did not converge" and float(rows[3]["psnr"]) >= 40


def test_a_failing_audit_report_never_stops_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The grid (or the CSV) failing to write, e.g. a full disk, costs the audit, not the round."""

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_jobs, "save_audit_grid", disk_full)
    strategy, inner = _auditor(tmp_path, ["analytic-fc"])
    replies = [train_reply_of(0, 0)]
    strategy.aggregate_train(1, replies)
    assert inner.aggregated == [replies]
    assert "round 1: the audit failed; the federation goes on" in caplog.text


def test_an_unreadable_reply_gets_rows_saying_so(tmp_path: Path) -> None:
    strategy, inner = _auditor(tmp_path, ["analytic-fc"])
    broken = train_reply_of(0, 0)
    broken.content[wire.ARRAYS] = ArrayRecord({"layers.1.weight": torch.zeros(2, 2)})
    strategy.aggregate_train(1, [broken])
    (row,) = _rows(tmp_path)
    assert row["status"] == "declined" and row["note"].startswith("reply not readable: KeyError")
    assert len(inner.aggregated) == 1


@pytest.mark.parametrize(("reported", "expected"), [(2, 2), (20, 8)])
def test_the_batch_size_comes_from_the_config_and_the_reported_examples(
    tmp_path: Path, reported: int, expected: int
) -> None:
    """Never from the truth record, which here holds 5 samples."""
    strategy, _ = _auditor(tmp_path, ["layerwise"], batch_size=8)
    strategy.aggregate_train(1, [train_reply_of(0, 0, num_examples=reported, truth_samples=5)])
    (row,) = _rows(tmp_path)
    assert (row["batch_size"], row["threat"].split()[0]) == (str(expected), f"fedsgd-b{expected}")
    assert row["status"] == "declined" and "needs a batch-1 gradient" in row["note"]


def test_resume_forgets_the_rows_and_grids_of_unfinished_rounds(tmp_path: Path) -> None:
    strategy, _ = _auditor(tmp_path, ["analytic-fc"])
    for server_round in (1, 2):
        strategy.aggregate_train(server_round, [train_reply_of(0, 0)])
    strategy.drop_rounds_after(1)
    assert [r["round"] for r in _rows(tmp_path)] == ["1"]
    assert [p.name for p in (tmp_path / GRID_FOLDER).iterdir()] == ["round-0001.png"]


def test_the_chain_factory_wraps_any_strategy(tmp_path: Path) -> None:
    config = RunConfig(
        dataset="digits", model="mlp", audit=True, audit_attacks="analytic-fc", audit_clients=1
    )
    inner = Recorder()
    wrapped = auditing_wrapper(config, tmp_path)(inner)
    assert isinstance(wrapped, StrategyWrapper) and wrapped.inner is inner
    assert (wrapped.batch_size, wrapped.max_clients) == (config.batch_size, 1)
    assert wrapped.training == ClientTraining.of(config)  # the run's momentum, not a bare rate


class _BagOfEmbeddings(ZooModel):
    """Tokens → trainable embedding → mean → linear: the token-set attack reads its embedding."""

    def __init__(self) -> None:
        super().__init__(InputSpec.tokens(5, 30, 2))
        self.embedding = torch.nn.Embedding(30, 8)
        self.readout = torch.nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.embedding(tokens).mean(dim=1))


def _token_model() -> ZooModel:
    torch.manual_seed(0)
    return _BagOfEmbeddings()


def _token_reply(partition_id: int, tokens: list[int]) -> Message:
    model = _token_model()
    x, y = torch.tensor([tokens]), torch.tensor([1])
    grads = observe_gradient(model, x, y).gradients
    local = {name: param.detach() - LR * grads[name] for name, param in model.named_parameters()}
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(local),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1, wire.LOCAL_STEPS: 1}),
            wire.CLIENT: ConfigRecord({wire.PARTITION_ID: partition_id}),
            wire.AUDIT_TRUTH: wire.encode_truth(x.numpy(), y.numpy()),
        }
    )
    metadata = Metadata(
        run_id=1, message_id=f"reply-{partition_id}", src_node_id=partition_id + 1, dst_node_id=0,
        reply_to_message_id="train", group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip
    return Message(content, metadata=metadata)


def test_token_models_get_a_text_table_per_round_and_resume_drops_later_ones(tmp_path: Path) -> None:
    decode = lambda ids: " ".join(f"w{int(i)}" for i in ids)  # noqa: E731
    strategy = AuditingStrategy(
        Recorder(), UpdateAuditor(["token-set"], decode), _token_model, PLAIN_SGD, 1, tmp_path
    )
    strategy.configure_train(1, ArrayRecord(_token_model().state_dict()), ConfigRecord(), grid=None)
    for server_round in (1, 2):
        strategy.aggregate_train(
            server_round, [_token_reply(0, [3, 7, 7, 12, 5]), _token_reply(1, [4, 9, 2, 2, 6])]
        )
    table = (tmp_path / GRID_FOLDER / "round-0001.md").read_text()
    assert table.startswith("# round 1, threat:")
    lines = [line for line in table.splitlines() if line.startswith("| ") and "token-set" in line]
    assert len(lines) == 2, table  # one line per client: the true bag beside the recovered one
    assert "w12" in lines[0] and "w9" in lines[1] and "~~" not in table, "every true token recovered"
    strategy.drop_rounds_after(1)
    assert sorted(p.name for p in (tmp_path / GRID_FOLDER).iterdir()) == ["round-0001.md", "round-0001.png"]


def test_every_row_of_a_momentum_runs_update_says_once_that_its_estimate_is_approximate(
    tmp_path: Path,
) -> None:
    """Momentum over two steps: dw/(lr*steps) is not the mean gradient, and each row of that update
    says so once (a reconstruction and a failure alike); one step from a zero buffer is exact."""
    training = ClientTraining(TrainingSettings(LR, momentum=0.9))
    strategy = AuditingStrategy(
        Recorder(), UpdateAuditor(["analytic-fc", Raises()]), digits_mlp, training, 1, tmp_path
    )
    strategy.configure_train(1, ArrayRecord(digits_mlp().state_dict()), ConfigRecord(), grid=None)
    strategy.aggregate_train(1, [train_reply_of(0, 0, local_steps=2), train_reply_of(1, 1)])
    note = APPROXIMATE_NOTE.format(reason=client_step(digits_mlp(), training.settings, 1).reason(2))
    assert "SGD momentum 0.9" in note
    rows = _rows(tmp_path)
    assert [(r["partition_id"], r["local_steps"], r["note"].count(note)) for r in rows] == [
        ("0", "2", 1),
        ("0", "2", 1),
        ("1", "1", 0),
        ("1", "1", 0),
    ]
    assert rows[1]["note"] == f"LinAlgError: SVD did not converge; {note}"
    assert rows[2]["note"] == "" and "approximate" not in rows[3]["note"]


@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["momentum", "plain-sgd"])
def test_the_secagg_aggregate_auditor_estimates_with_the_runs_client_step(
    tmp_path: Path, momentum: float
) -> None:
    config = RunConfig(secagg=True, num_clients=3, audit=True, learning_rate=0.1, momentum=momentum)
    before = {k: v.numpy() for k, v in model_for(config).state_dict().items()}
    after = {k: v - 0.01 for k, v in before.items()}
    clients = [ClientResult(p, 100 + p, {wire.LOCAL_STEPS: 4}) for p in range(3)]
    AggregateAuditor(config, tmp_path)(AggregateRound(7, before, after, clients))
    (row,) = audit_rows(tmp_path)
    assert row["note"].startswith(PER_CLIENT_IMPOSSIBLE)
    momentum_note = "gradient estimate dw/(lr*steps) is approximate: SGD momentum 0.9"
    assert row["note"].count(momentum_note) == (1 if momentum else 0), row["note"]
