"""The audit engine: rows for every attack whatever happens, labels as a multiset, own-PSNR captions,
one CSV schema and one summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.base import ObservedUpdate, Reconstruction, observe_gradient
from audits.scoring.engine import (
    AUDIT_COLUMNS,
    DECLINED,
    EMPTY_BATCH_NOTE,
    FAILED,
    NO_TRUTH_NOTE,
    NOISE_ONLY,
    NON_FINITE_NOTE,
    RECONSTRUCTED,
    AuditContext,
    Truth,
    UpdateAuditor,
    measure_security,
)
from audits.scoring.leakage import label_score
from audits.scoring.summary import read_audit_rows, save_audit_grid, short_reason, summarise_audit
from fedsim.data.photos import photo_crops
from fedsim.store.csv_log import CsvLog
from models import InputSpec, ZooModel, build_model

SHAPE = (3, 8, 8)


class Raises:
    """An attack broken in a way no AttackError announces."""

    name = "raises"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        raise RuntimeError("solver exploded")


class Returns:
    """An attack that returns fixed images and labels (what a perfect or a partial attack would)."""

    def __init__(self, name: str, images: np.ndarray, labels: list[int] | None) -> None:
        self.name, self.images, self.labels = name, images, labels

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        labels = None if self.labels is None else torch.tensor(self.labels)
        return Reconstruction(torch.from_numpy(self.images), labels, seconds=0.5)


def _mlp(head: str = "ce") -> ZooModel:
    torch.manual_seed(0)
    return build_model("mlp", InputSpec(SHAPE, 10), head=head)


def _crops(count: int) -> tuple[np.ndarray, np.ndarray]:
    return photo_crops(count, size=SHAPE[1], seed=4)


def _update(model: ZooModel, x: np.ndarray, y: np.ndarray) -> ObservedUpdate:
    return observe_gradient(model, torch.from_numpy(x), torch.from_numpy(y))


def test_an_attack_that_raises_anything_records_a_failed_row_and_the_others_still_run() -> None:
    model = _mlp()
    x, y = _crops(1)
    nan_images = Returns("nan-images", np.full((1, *SHAPE), np.nan, dtype=np.float32), None)
    auditor = UpdateAuditor([Raises(), nan_images, "analytic-fc"])
    audit = auditor.audit(_update(model, x, y), Truth(x, y), AuditContext("fedsgd-b1", round=3))
    raised, nan, analytic = audit.rows
    assert (raised.status, raised.note, raised.psnr) == (FAILED, "RuntimeError: solver exploded", None)
    assert nan.status == FAILED and "non-finite images" in nan.note
    assert analytic.status == RECONSTRUCTED and analytic.psnr >= 60 and analytic.label_score == 1.0
    assert all(r.round == 3 for r in audit.rows)


def test_a_non_finite_update_is_declined_and_never_raises() -> None:
    model = _mlp()
    x, y = _crops(1)
    update = _update(model, x, y)
    update.gradients["layers.1.weight"][0, 0] = float("nan")
    audit = UpdateAuditor(["layerwise", "analytic-fc", "idlg"]).audit(update, Truth(x, y), AuditContext("t"))
    assert [r.status for r in audit.rows] == [DECLINED] * 3
    assert {r.note for r in audit.rows} == {NON_FINITE_NOTE}
    assert audit.original is not None and not audit.images  # the grid still shows the sample


def test_without_truth_the_update_is_attacked_and_leakage_left_unmeasured() -> None:
    model = _mlp()
    x, y = _crops(1)
    context = AuditContext("fedsgd-b1", round=1, partition_id=2, rank_score=0.0)
    audit = UpdateAuditor(["analytic-fc"]).audit(_update(model, x, y), None, context)
    (row,) = audit.rows
    assert row.status == RECONSTRUCTED and row.note == NO_TRUTH_NOTE
    assert (row.psnr, row.ssim, row.label_score, row.true_labels) == (None, None, None, "")
    assert row.recovered_labels == str(int(y[0])) and row.rank_score == 0.0  # what leaked, still known
    assert audit.original is None and audit.images["analytic-fc"].shape == SHAPE


def test_truth_not_shaped_like_the_inputs_is_not_scored() -> None:
    model = _mlp()
    x, y = _crops(1)
    wrong = Truth(np.zeros((1, 1, 4, 4), dtype=np.float32), y)
    (row,) = UpdateAuditor(["analytic-fc"]).audit(_update(model, x, y), wrong, AuditContext("t")).rows
    assert row.status == RECONSTRUCTED and row.psnr is None and "do not fit the model's inputs" in row.note


def test_an_update_whose_poisson_batches_were_all_empty_is_noise_only_not_a_reconstruction() -> None:
    """DP-SGD's Poisson sampling can leave a client no sample: the rows say so with their own
    status, no attack runs on pure noise, and the summary counts them apart."""
    model = _mlp()
    x, y = _crops(1)
    empty = Truth(np.zeros((0, *SHAPE), dtype=np.float32), np.zeros(0, dtype=np.int64))
    audit = UpdateAuditor(["analytic-fc", "idlg"]).audit(_update(model, x, y), empty, AuditContext("t"))
    assert [(r.attack, r.status, r.note) for r in audit.rows] == [
        ("analytic-fc", NOISE_ONLY, EMPTY_BATCH_NOTE),
        ("idlg", NOISE_ONLY, EMPTY_BATCH_NOTE),
    ]
    assert all(r.psnr is None and r.seconds == 0.0 for r in audit.rows) and audit.images == {}
    (first, _) = summarise_audit(audit.rows)
    assert first["noise_only"] == 1 and first["reconstructed"] == 0 and first["note"] == EMPTY_BATCH_NOTE


def test_label_score_is_the_share_of_recovered_labels_matching_distinct_true_ones() -> None:
    assert label_score(np.array([1, 2, 2, 5]), np.array([2, 5, 1, 1])) == 0.75
    assert label_score(np.array([1, 2, 2, 5]), np.array([5, 2, 1, 2])) == 1.0
    assert label_score(np.array([4]), np.array([3])) == 0.0
    assert label_score(np.array([4]), None) is None


def test_a_batch_update_scores_labels_as_a_multiset_through_the_models_targets() -> None:
    x, y = _crops(4)
    y = np.array([1, 2, 2, 5])
    model = _mlp()
    permuted = Returns("perfect", x[[2, 0, 3, 1]], [2, 5, 1, 1])
    (row,) = UpdateAuditor([permuted]).audit(_update(model, x, y), Truth(x, y), AuditContext("b4")).rows
    assert row.label_score == 0.75 and row.psnr == pytest.approx(150.0)  # every image recovered
    # A single-logit head trains on (and leaks) the parity only: 1 for label 7 is right.
    logistic = _mlp("logistic")
    x1, y1 = x[:1], np.array([7])
    parity = Returns("parity", x1, [1])
    (row,) = UpdateAuditor([parity]).audit(_update(logistic, x1, y1), Truth(x1, y1), AuditContext("b1")).rows
    assert row.label_score == 1.0 and row.true_labels == "7"


def test_each_reconstruction_is_shown_with_its_own_psnr(tmp_path: Path) -> None:
    model = _mlp()
    x, y = _crops(2)
    exact = Returns("exact", x[1:], None)  # recovers sample 1 exactly
    offset = Returns("offset", np.clip(x + 0.1, 0, 1)[::-1].copy(), None)  # both, shifted
    audit = UpdateAuditor([exact, offset, Raises()]).audit(
        _update(model, x, y), Truth(x, y), AuditContext("t")
    )
    assert np.array_equal(audit.original, x[1])  # the sample the best attack came closest to
    assert audit.image_psnr["exact"] == pytest.approx(150.0)
    assert audit.image_psnr["offset"] < 30 and np.array_equal(
        audit.images["offset"], np.clip(x + 0.1, 0, 1)[1]
    )
    # The grid shows the sample the attack recovered best, not the one its first image resembles.
    partial = Returns("partial", np.stack([np.clip(x[0] + 0.2, 0, 1), x[1]]), None)
    audit_partial = UpdateAuditor([partial]).audit(_update(model, x, y), Truth(x, y), AuditContext("t"))
    assert np.array_equal(audit_partial.original, x[1]) and audit_partial.image_psnr["partial"] == 150.0
    path = tmp_path / "grid.png"
    save_audit_grid([audit], path, title="round 1, threat: t", column_titles=["client 0"])
    assert path.stat().st_size > 5_000
    assert short_reason("layer-wise inversion needs a batch-1 gradient, got 4; use another") == (
        "layer-wise inversion\nneeds a batch-1\ngradient, got 4"
    )


def test_rows_round_trip_through_the_one_csv_schema_and_summarise_alike(tmp_path: Path) -> None:
    model = _mlp()
    x, y = _crops(1)
    auditor = UpdateAuditor(["analytic-fc", "layerwise", Raises()])
    rows = [
        *auditor.audit(_update(model, x, y), Truth(x, y), AuditContext("t", round=1, partition_id=0)).rows,
        *auditor.audit(_update(model, x, y), None, AuditContext("t", round=1, partition_id=1)).rows,
    ]
    CsvLog(tmp_path / "audit.csv", AUDIT_COLUMNS).append(r.to_dict() for r in rows)
    assert read_audit_rows(tmp_path / "audit.csv") == rows
    summary = summarise_audit(tmp_path / "audit.csv")
    assert summary == summarise_audit(rows)
    analytic, _, raised = summary
    assert (analytic["updates"], analytic["reconstructed"], analytic["scored"]) == (2, 2, 1)
    assert analytic["note"] == NO_TRUTH_NOTE and analytic["label_score"] == 1.0
    assert (raised["failed"], raised["mean_psnr"], raised["note"]) == (
        2,
        None,
        "RuntimeError: solver exploded",
    )


def test_the_security_metric_reports_failures_as_a_note() -> None:
    model = _mlp()
    assert measure_security(model, SHAPE).score == 0
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    broken = measure_security(model, SHAPE)
    assert broken.score is None and broken.note.startswith("failed: ")


def test_feature_samples_are_attacked_but_not_scored_as_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", InputSpec.features(64, 10))
    x, y = np.random.default_rng(0).random((1, 64), dtype=np.float32), np.array([3])
    audit = UpdateAuditor(["analytic-fc"]).audit(_update(model, x, y), Truth(x, y), AuditContext("t"))
    (row,) = audit.rows
    assert row.status == RECONSTRUCTED and row.psnr is None and "features samples are not images" in row.note
    save_audit_grid([audit], tmp_path / "grid.png", title="features", column_titles=["client 0"])
    assert (tmp_path / "grid.png").is_file()
