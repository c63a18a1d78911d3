"""Text leakage: the token set from the embedding gradient, DAGER's span test, the text metrics,
and the audit rows and table that carry them."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from attacks.base import AttackError, observe_gradient
from attacks.registry import build_attack
from attacks.text.token_leakage import ORDERED_KEY, TOKEN_SET_KEY, DagerAttack, TokenSetAttack
from audits.architecture.standalone import audit_model
from audits.scoring.engine import AUDIT_COLUMNS, RECONSTRUCTED, TEXT_COLUMNS, AuditRow
from audits.scoring.text_table import marked_pair
from audits.similarity.text import score_text, token_precision_recall
from fedsim.store.audit_folder import AUDIT_FILE, TEXT_TABLE_FILE, write_audit
from models.base import InputSpec, ZooModel
from models.tiny_transformer import tiny_transformer

SPEC = InputSpec.tokens(length=12, vocab_size=60, num_classes=3)


def _model(seed: int = 0, **options) -> ZooModel:
    torch.manual_seed(seed)
    return tiny_transformer(SPEC, width=64, **options)


def _batch(seed: int, batch: int, lengths: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """Random sequences of ids 1.. (0 is padding), padded after `lengths` tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, SPEC.vocab_size, (batch, 12), generator=generator)
    for row, length in enumerate(lengths or []):
        tokens[row, length:] = 0
    return tokens, torch.randint(0, 3, (batch,), generator=generator)


def _true_set(tokens: Tensor) -> set[int]:
    return {int(t) for t in tokens.reshape(-1) if int(t) != 0}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("attack", ["token-set", "dager"])
def test_single_sequence_tokens_are_recovered_exactly(seed: int, attack: str) -> None:
    tokens, labels = _batch(seed, 1, lengths=[12 - 3 * seed])
    update = observe_gradient(_model(seed), tokens, labels)
    rec = build_attack(attack).reconstruct(update)
    precision, recall = token_precision_recall(set(rec.diagnostics[TOKEN_SET_KEY]) - {0}, _true_set(tokens))
    assert (precision, recall) == (1.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_dager_recovers_the_sequence_in_order(seed: int) -> None:
    tokens, labels = _batch(seed, 1, lengths=[9])
    rec = DagerAttack().reconstruct(observe_gradient(_model(seed), tokens, labels))
    assert rec.diagnostics[ORDERED_KEY] is True
    recovered = rec.inputs.long()
    assert torch.equal(recovered[0, :9], tokens[0, :9])
    score = score_text(recovered.numpy(), tokens.numpy(), ordered=True)
    assert (score.exact_sequence, score.rouge1, score.rouge2) == (1.0, 1.0, 1.0)
    assert score.bleu == pytest.approx(100.0)


def test_dager_recovers_the_token_set_of_a_batch_and_positions_of_its_unique_tokens() -> None:
    """B = 3, 25 tokens < 64 dimensions: the token set is exact. A token that occurs at one
    position only and shares it with no other token's position pair is recovered at its place."""
    tokens, labels = _batch(5, 3, lengths=[12, 8, 5])
    rec = DagerAttack().reconstruct(observe_gradient(_model(5), tokens, labels))
    assert set(rec.diagnostics[TOKEN_SET_KEY]) == _true_set(tokens)
    assert "naively" in rec.diagnostics["note"]
    recovered = rec.inputs.long()
    true_first = tokens[0, 8:]  # only sequence 0 reaches positions 8..11: one true token each
    assert torch.equal(recovered[0, 8:], true_first)


def test_dager_grows_the_sequences_of_a_causal_batch_exactly() -> None:
    """A causal model: prefixes extended through a later per-token Linear give every sequence."""
    tokens, labels = _batch(6, 3, lengths=[12, 7, 4])
    rec = DagerAttack().reconstruct(observe_gradient(_model(6, causal=True), tokens, labels))
    assert "sequences grown through" in rec.diagnostics["note"]
    score = score_text(rec.inputs.long().numpy(), tokens.numpy(), ordered=True)
    assert (score.exact_sequence, score.rouge1, score.rouge2) == (1.0, 1.0, 1.0)
    assert len(rec.inputs) == 3


def test_frozen_embedding_token_set_declines_but_dager_searches_the_vocabulary() -> None:
    model = _model(3, frozen_embedding=True)
    tokens, labels = _batch(3, 1)
    update = observe_gradient(model, tokens, labels)  # the frozen embedding's entry is zero
    with pytest.raises(AttackError, match="frozen"):
        TokenSetAttack().reconstruct(update)
    rec = DagerAttack().reconstruct(update)
    assert "whole vocabulary" in rec.diagnostics["candidates"]
    assert torch.equal(rec.inputs.long(), tokens)


def test_dager_declines_when_the_batch_fills_the_span() -> None:
    # With additive positions the inputs span at most (distinct tokens + positions) dimensions:
    # 16 sequences use nearly all 59 tokens, 59 + 12 > 63 (LayerNorm keeps d - 1 dimensions).
    tokens, labels = _batch(4, 16)
    with pytest.raises(AttackError, match="full rank"):
        DagerAttack().reconstruct(observe_gradient(_model(4), tokens, labels))


class _Mixing(ZooModel):
    """A causal convolution over positions before the first Linear: inputs are not per token."""

    def __init__(self) -> None:
        super().__init__(SPEC)
        self.embedding = nn.Embedding(60, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=2)
        self.project = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.conv(self.embedding(inputs).transpose(1, 2))[:, :, : inputs.shape[1]].transpose(1, 2)
        return self.classifier(torch.tanh(self.project(x)).mean(1))


class _NoPositions(ZooModel):
    def __init__(self) -> None:
        super().__init__(SPEC)
        self.embedding = nn.Embedding(60, 32)
        self.project = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classifier(torch.tanh(self.project(self.embedding(inputs))).mean(1))


def test_dager_declines_a_model_that_mixes_positions_before_its_first_linear() -> None:
    torch.manual_seed(0)
    tokens, labels = _batch(0, 1)
    with pytest.raises(AttackError, match="depends on other positions"):
        DagerAttack().reconstruct(observe_gradient(_Mixing(), tokens, labels))


def test_dager_without_positional_input_recovers_the_set_only() -> None:
    torch.manual_seed(0)
    tokens, labels = _batch(0, 1)
    rec = DagerAttack().reconstruct(observe_gradient(_NoPositions(), tokens, labels))
    assert rec.diagnostics[ORDERED_KEY] is False
    assert set(rec.diagnostics[TOKEN_SET_KEY]) == _true_set(tokens)


def test_text_metrics_match_hand_computed_values() -> None:
    assert token_precision_recall({1, 2, 3}, {2, 3, 4, 5}) == (2 / 3, 2 / 4)
    # words w5 w6 w7 against w5 w6 w8 (padding 0 dropped): unigram F 2/3, bigram F 1/2.
    score = score_text(np.array([[5, 6, 7, 0]]), np.array([[5, 6, 8, 0]]), ordered=True)
    assert score.exact_sequence == 0.0
    assert score.rouge1 == pytest.approx(2 / 3)
    assert score.rouge2 == pytest.approx(1 / 2)
    assert score.token_precision == pytest.approx(2 / 3) and score.token_recall == pytest.approx(2 / 3)
    disjoint = score_text(np.array([[9, 10, 11]]), np.array([[5, 6, 8]]), ordered=True)
    assert (disjoint.rouge1, disjoint.bleu) == (0.0, 0.0)
    bag = score_text(np.array([[7, 5]]), np.array([[5, 6, 7]]), ordered=False)
    assert (bag.token_precision, bag.token_recall, bag.exact_sequence, bag.bleu) == (1.0, 2 / 3, None, None)
    # one of two true sequences recovered verbatim
    half = score_text(np.array([[1, 2, 0], [3, 3, 3]]), np.array([[1, 2, 0], [3, 4, 0]]), ordered=True)
    assert half.exact_sequence == 0.5


def test_text_table_marks_the_differences() -> None:
    left, right = marked_pair(["a", "b", "c"], ["a", "x", "c"])
    assert (left, right) == ("a ~~b~~ c", "a **x** c")


def test_audit_rows_and_csv_carry_the_text_metrics(tmp_path) -> None:
    assert set(TEXT_COLUMNS) <= set(AUDIT_COLUMNS)
    tokens, labels = _batch(7, 2, lengths=[12, 6])
    audit = audit_model(_model(7), tokens.numpy(), labels.numpy(), ["token-set", "dager"], decode=_words)
    rows = {(row.sample, row.attack): row for row in audit.rows}
    for sample in (0, 1):
        token_set, dager = rows[(sample, "token-set")], rows[(sample, "dager")]
        assert token_set.status == dager.status == RECONSTRUCTED
        set_scores = (token_set.token_precision, token_set.token_recall, token_set.exact_sequence)
        assert set_scores == (1.0, 1.0, None)
        dager_scores = (dager.exact_sequence, dager.rouge1, dager.rouge2, dager.bleu)
        assert dager_scores == (1.0, 1.0, 1.0, pytest.approx(100))
        assert dager.psnr is None
    assert "| 1 | dager | 0 |" in audit.text_table and "~~" not in audit.text_table.split("dager")[1]
    path = tmp_path / "audit.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=AUDIT_COLUMNS)
        writer.writeheader()
        writer.writerows(row.to_dict() for row in audit.rows)
    with path.open(newline="") as f:
        back = [AuditRow.from_csv(r) for r in csv.DictReader(f)]
    assert back == audit.rows
    old = {k: "" if v is None else str(v) for k, v in audit.rows[0].to_dict().items()}
    for key in TEXT_COLUMNS:  # an audit.csv written before the text columns still parses
        old.pop(key)
    assert AuditRow.from_csv(old).token_precision is None


def _words(ids) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


def test_audit_folder_writes_the_text_columns_and_the_text_table(tmp_path) -> None:
    tokens, labels = _batch(8, 2, lengths=[10, 4])
    audit = audit_model(_model(8), tokens.numpy(), labels.numpy(), ["token-set", "dager"], decode=_words)
    folder = tmp_path / "audit"
    write_audit(folder, audit, {"model": "tiny-transformer", "dataset": "random tokens", "weights": None})
    with (folder / AUDIT_FILE).open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == AUDIT_COLUMNS
        written = list(reader)
    assert {r["exact_sequence"] for r in written if r["attack"] == "dager"} == {"1.0"}
    assert {r["exact_sequence"] for r in written if r["attack"] == "token-set"} == {""}
    table = (folder / TEXT_TABLE_FILE).read_text()
    assert " ".join(f"t{int(t)}" for t in tokens[1, :4]) in table


def test_gradient_noise_fills_the_span_and_every_embedding_row() -> None:
    """DP-style noise: dager declines (the span is everything), token-set claims every token."""
    tokens, labels = _batch(1, 1)
    audit = audit_model(
        _model(1), tokens.numpy(), labels.numpy(), ["token-set", "dager"], gradient_noise=1e-4
    )
    rows = {row.attack: row for row in audit.rows}
    assert rows["dager"].status == "declined" and "noise on the gradient" in rows["dager"].note
    assert rows["token-set"].token_recall == 1.0
    assert rows["token-set"].token_precision == pytest.approx(len(_true_set(tokens)) / (SPEC.vocab_size - 1))
