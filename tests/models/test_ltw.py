"""Learning to Weight: contingency counts and rates, the summed client counts, the fixed
baselines, the server's count policy, the g surface, the audit, and a federation that learns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.training.local import evaluate
from models import InputSpec, TrainingSettings, build_model, parse_model_options
from models.learning_to_weight import (
    CLASS_DOCS,
    COUNTS_RECORD,
    TERM_CLASS_DF,
    LearningToWeight,
    chi_square,
    contingency_counts,
    information_gain,
    macro_f1,
    rates,
    sum_counts,
    term_frequencies,
)
from models.ltw_figure import save_g_surface

SPEC = InputSpec.tokens(6, 8, 3)
# Five documents over terms 1..7 (0 = padding), classes 0, 0, 1, 2, 2.
DOCS = torch.tensor(
    [
        [2, 3, 3, 0, 0, 0],
        [2, 4, 0, 0, 0, 0],
        [3, 5, 6, 6, 6, 0],
        [2, 7, 0, 0, 0, 0],
        [1, 1, 7, 2, 0, 0],
    ]
)
LABELS = torch.tensor([0, 0, 1, 2, 2])


def _ltw(spec: InputSpec = SPEC, **options: object) -> LearningToWeight:
    torch.manual_seed(0)
    model = build_model("ltw", spec, **options)
    assert isinstance(model, LearningToWeight)
    return model


def test_term_frequencies_count_tokens_and_ignore_padding() -> None:
    tf = term_frequencies(DOCS, 8)
    assert tf[2].tolist() == [0, 0, 0, 1, 0, 1, 3, 0]
    assert tf[0].tolist() == [0, 0, 1, 2, 0, 0, 0, 0], "padding (id 0) is not a term"


def test_tpr_and_fpr_match_a_hand_computation() -> None:
    df, docs = contingency_counts(DOCS, LABELS, 8, 3)
    assert docs.tolist() == [2, 1, 2]
    # term 2 is in docs 0, 1 (class 0) and 3, 4 (class 2); term 3 in doc 0 (class 0) and doc 2 (class 1)
    assert df[:, 2].tolist() == [2, 0, 2] and df[:, 3].tolist() == [1, 1, 0]
    assert df[:, 0].tolist() == [0, 0, 0], "padding counts in no document"
    tpr, fpr = rates(df, docs)
    assert tpr[0, 2].item() == pytest.approx(2 / 2) and fpr[0, 2].item() == pytest.approx(2 / 3)
    assert tpr[1, 3].item() == pytest.approx(1 / 1) and fpr[1, 3].item() == pytest.approx(1 / 4)
    assert tpr[2, 7].item() == pytest.approx(2 / 2) and fpr[2, 7].item() == pytest.approx(0 / 3)
    assert tpr[2, 3].item() == 0 and fpr[2, 3].item() == pytest.approx(2 / 3)


def test_chi_square_and_information_gain_match_a_hand_computation() -> None:
    df, docs = contingency_counts(DOCS, LABELS, 8, 3)
    # term 7 vs class 2: a = 2 (t, c), b = 0, c = 0, d = 3 of N = 5: a perfect predictor
    assert chi_square(df, docs)[2, 7].item() == pytest.approx(5.0)
    p_t, p_c = 2 / 5, 2 / 5
    ig = 2 / 5 * math.log((2 / 5) / (p_t * p_c)) + 3 / 5 * math.log((3 / 5) / ((1 - p_t) * (1 - p_c)))
    assert information_gain(df, docs)[2, 7].item() == pytest.approx(ig, rel=1e-5)
    assert chi_square(df, docs)[:, 0].tolist() == [0, 0, 0], "a term in no document weighs 0"


def _client_records(splits: list[slice]) -> list[dict[str, dict[str, np.ndarray]]]:
    """What each client sends in the counting round, through the model's own hooks."""
    records = []
    for part in splits:
        client = _ltw()
        data = torch.utils.data.TensorDataset(DOCS[part], LABELS[part], torch.arange(len(LABELS[part])))
        client.before_local_training(torch.utils.data.DataLoader(data, batch_size=2, shuffle=True), 1)
        records.append(client.extra_records())
    return records


def test_summed_client_counts_equal_the_pooled_counts() -> None:
    records = _client_records([slice(0, 2), slice(2, 3), slice(3, 5)])
    pooled_df, pooled_docs = contingency_counts(DOCS, LABELS, 8, 3)
    df, docs = sum_counts([r[COUNTS_RECORD] for r in records], 3, 8)
    assert np.array_equal(df, pooled_df.numpy()) and np.array_equal(docs, pooled_docs.numpy())
    assert not np.array_equal(records[0][COUNTS_RECORD][TERM_CLASS_DF], pooled_df.numpy())


def _aggregate(server: LearningToWeight, previous: dict[str, np.ndarray], records: list) -> dict:
    """The aggregate as FedAvg leaves it (integers averaged into float64), through the hook."""
    aggregated = {k: (v.astype(np.float64) + 0.5 if v.dtype.kind == "i" else v) for k, v in previous.items()}
    return server.after_aggregation(aggregated, previous, records, TrainingSettings(0.1, rounds=3), 1)


def test_server_writes_the_sum_once_and_clients_cannot_change_it() -> None:
    server = _ltw()
    previous = {k: v.numpy() for k, v in server.state_dict().items()}
    records = _client_records([slice(0, 3), slice(3, 5)])
    first = _aggregate(server, previous, records)
    pooled_df, pooled_docs = contingency_counts(DOCS, LABELS, 8, 3)
    assert np.array_equal(first[TERM_CLASS_DF], pooled_df.numpy())
    assert first[TERM_CLASS_DF].dtype == np.float64, "the hook keeps the aggregate's dtype"
    known = {**previous, TERM_CLASS_DF: pooled_df.numpy(), CLASS_DOCS: pooled_docs.numpy()}
    forged = {COUNTS_RECORD: {TERM_CLASS_DF: np.ones((3, 8), np.int64), CLASS_DOCS: np.full(3, 9)}}
    later = _aggregate(server, known, [forged])
    assert np.array_equal(later[TERM_CLASS_DF], pooled_df.numpy()), "counts fixed once known"
    assert np.array_equal(later[CLASS_DOCS], pooled_docs.numpy())


def test_clients_send_counts_only_while_the_global_counts_are_empty() -> None:
    client = _ltw()
    client.term_class_df[0, 1], client.class_docs[0] = 1, 1
    data = torch.utils.data.TensorDataset(DOCS, LABELS, torch.arange(5))
    client.before_local_training(torch.utils.data.DataLoader(data, batch_size=5), 2)
    assert client.extra_records() == {} and client.class_docs.tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({TERM_CLASS_DF: np.zeros((3, 8), np.int64)}, "has fields"),
        ({TERM_CLASS_DF: np.zeros((3, 7), np.int64), CLASS_DOCS: np.zeros(3, np.int64)}, "shape"),
        ({TERM_CLASS_DF: np.zeros((3, 8)), CLASS_DOCS: np.zeros(3, np.int64)}, "not whole numbers"),
        ({TERM_CLASS_DF: -np.ones((3, 8), np.int64), CLASS_DOCS: np.ones(3, np.int64)}, "negative"),
        ({TERM_CLASS_DF: np.full((3, 8), 2), CLASS_DOCS: np.ones(3, np.int64)}, "more documents"),
    ],
)
def test_invalid_count_records_are_refused(payload: dict, problem: str) -> None:
    assert problem in str(_ltw().extra_record_problem(COUNTS_RECORD, payload))


def test_a_valid_count_record_is_accepted_and_other_names_refused() -> None:
    record = _client_records([slice(0, 5)])[0][COUNTS_RECORD]
    model = _ltw()
    assert model.extra_record_problem(COUNTS_RECORD, record) is None
    assert "sends no record" in str(model.extra_record_problem("push", record))


def test_fixed_weightings_train_the_head_only_and_learned_trains_g() -> None:
    for weighting, trains_g in (("idf", False), ("chi2", False), ("ig", False), ("learned", True)):
        model = _ltw(weighting=weighting)
        model.term_class_df.copy_(contingency_counts(DOCS, LABELS, 8, 3)[0])
        model.class_docs.copy_(torch.tensor([2, 1, 2]))
        before = [p.detach().clone() for p in model.g.parameters()]
        optimizer = model.configure_optimizer(TrainingSettings(0.1), 2)
        for _ in range(3):
            optimizer.zero_grad()
            model.training_loss(model, DOCS, LABELS).backward()
            optimizer.step()
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.g.parameters(), strict=True))
        assert moved == trains_g, weighting


def test_forward_is_the_l2_normalised_weighted_log_tf_under_each_class() -> None:
    model = _ltw(weighting="chi2")
    model.term_class_df.copy_(contingency_counts(DOCS, LABELS, 8, 3)[0])
    model.class_docs.copy_(torch.tensor([2, 1, 2]))
    weights = model.term_weights()
    logtf = torch.log1p(term_frequencies(DOCS, 8))
    expected = torch.stack(
        [
            torch.nn.functional.normalize(logtf * weights[k], dim=1) @ model.classifier.weight[k]
            + model.classifier.bias[k]
            for k in range(3)
        ],
        dim=1,
    )
    assert torch.allclose(model(DOCS), expected, atol=1e-5)
    assert torch.allclose(model.forward_embedded(model.embed(DOCS)), model(DOCS))


def test_macro_f1_from_the_confusion_fractions_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    model = _ltw(InputSpec.tokens(6, 8, 3))
    torch.manual_seed(1)
    tokens, labels = torch.randint(0, 8, (50, 6)), torch.randint(0, 3, (50,))
    result = evaluate(model, tokens, labels, batch_size=7)
    predicted = model(tokens).argmax(1).numpy()
    expected = f1_score(labels.numpy(), predicted, average="macro", zero_division=0)
    assert macro_f1(result.metrics, 3) == pytest.approx(expected, abs=1e-9)
    assert result.metrics["accuracy"] == pytest.approx(float((predicted == labels.numpy()).mean()))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("weighting=bm25", "weighting='bm25' is unknown"),
        ("hidden=0", "hidden must be at least 1"),
        ("lr=0", "lr must be > 0"),
    ],
)
def test_bad_options_are_refused(options: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_model("ltw", SPEC, **parse_model_options("ltw", options))


def test_ltw_takes_tokens_only() -> None:
    with pytest.raises(ValueError, match="takes tokens inputs, not image"):
        build_model("ltw", InputSpec((1, 8, 8), 10))


def test_g_surface_plot_writes_a_png(tmp_path: Path) -> None:
    model = _ltw()
    path = save_g_surface(model, tmp_path / "g.png", resolution=21)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_attacks_say_why_they_do_not_apply_and_idlg_reads_the_label() -> None:
    from attacks.analytic.closed_form import recover_labels_idlg
    from attacks.auto import AutoAttack
    from attacks.base import AttackError, observe_gradient

    model = _ltw()
    update = observe_gradient(model, DOCS[2:3], LABELS[2:3])
    assert recover_labels_idlg(update).tolist() == [1], "the classifier bias gradient names the label"
    with pytest.raises(AttackError, match="token ids are discrete") as declined:
        AutoAttack().reconstruct(update)
    assert "no flat `layers`" in str(declined.value)
    grad = update.gradients["classifier.weight"]
    assert (grad.abs().sum(0) > 0).nonzero().flatten().tolist() == [3, 5, 6], "support = the token set"
