"""Splash-drop FNN: the drop generator (labels by the threshold, a main-body-only variant without
droplets), the model and its weight map, its audit, and a federation that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from fedsim.api import audit
from fedsim.data import load_dataset
from fedsim.data.registry import SPLASH_TRAIN_COUNT
from fedsim.data.splash import (
    HEIGHT_RANGE_CM,
    OUTCOME_SCATTER,
    SUBSTRATE_ROW,
    THRESHOLD_CM,
    liquid_coverage,
    render_drops,
    sample_drops,
)
from models import InputSpec, build_model
from models.splash_fnn import save_weight_map

SPEC = InputSpec.image((1, 64, 64), 2)


def test_labels_follow_the_threshold_and_only_near_it_does_the_picture_disagree() -> None:
    drops = sample_drops(3000, seed=5)
    low, high = HEIGHT_RANGE_CM
    assert drops.heights.min() >= low and drops.heights.max() <= high
    np.testing.assert_array_equal(drops.labels, (drops.heights > THRESHOLD_CM).astype(np.int64))
    assert 0.3 < drops.labels.mean() < 0.7
    # Droplets are what a splash looks like; they disagree with the label only near the threshold.
    looks_splashed = drops.droplet_count > 0
    disagree = looks_splashed != (drops.labels == 1)
    assert 0 < disagree.sum() < 0.05 * len(drops)
    severity = np.abs(np.log(drops.heights[disagree] / THRESHOLD_CM))
    assert severity.max() < 5 * OUTCOME_SCATTER


def test_main_body_only_variant_is_the_same_drops_without_droplets() -> None:
    drops = sample_drops(400, seed=6)
    full, body = render_drops(drops, droplets=True), render_drops(drops, droplets=False)
    has_droplets = drops.droplet_count > 0
    assert has_droplets.sum() > 100
    np.testing.assert_array_equal(full[~has_droplets], body[~has_droplets])
    # Wherever the two differ, a droplet is within its radius (plus the anti-aliasing pixel).
    rows, cols = np.mgrid[0:64, 0:64]
    for i in np.flatnonzero(has_droplets)[:50]:
        changed = full[i, 0] != body[i, 0]
        assert changed.any()
        near = np.zeros((64, 64), dtype=bool)
        for x, y, r in drops.droplets[i, : drops.droplet_count[i]]:
            near |= np.hypot(cols - x, rows - y) <= r + 1.0
        assert not (changed & ~near).any()

    # Noise-free: above the surface the body variant is one piece of liquid (body + lamella,
    # 8-connected: a thin lifted sheet is a diagonal line of pixels), the full one is not.
    def pieces(droplets: bool) -> list[int]:
        covers = liquid_coverage(drops, droplets)[:, :SUBSTRATE_ROW]
        return [ndimage.label(c > 0.5, structure=np.ones((3, 3)))[1] for c in covers]

    body_pieces, full_pieces = pieces(droplets=False), pieces(droplets=True)
    assert set(body_pieces) == {1}
    assert all(full_pieces[i] > 1 for i in np.flatnonzero(has_droplets))


def test_registered_variants_hold_the_same_drops_and_heights() -> None:
    full, body = load_dataset("splash"), load_dataset("splash-body")
    assert full.x_train.shape == (SPLASH_TRAIN_COUNT, 1, 64, 64) and full.spec == body.spec == SPEC
    np.testing.assert_array_equal(full.y_train, body.y_train)
    np.testing.assert_array_equal(full.covariate_train, body.covariate_train)
    np.testing.assert_array_equal(full.covariate_test, body.covariate_test)
    same = (full.x_train == body.x_train).all(axis=(1, 2, 3))
    assert 0.4 < same.mean() < 0.8, "images differ exactly where droplets were drawn"
    assert (full.x_train[~same] >= body.x_train[~same]).all(), "droplets only add liquid"


def test_generator_repeats_under_its_seed() -> None:
    first, again, other = (render_drops(sample_drops(50, seed)) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("hidden", [0, 7])
def test_weight_map_is_the_splash_direction_of_the_network(hidden: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("splash-fnn", SPEC, hidden=hidden)
    weights = [m.weight.detach() for m in model.layers if isinstance(m, torch.nn.Linear)]
    assert len(weights) == (2 if hidden else 1)
    direction = weights[-1][1] - weights[-1][0]
    if hidden:
        direction = direction @ weights[0]
    np.testing.assert_allclose(model.class_weight_map(), direction.reshape(64, 64).numpy(), atol=1e-7)
    # For the zero-hidden net the map is exact: the logit difference is <map, image> + a constant.
    image = torch.rand(1, 1, 64, 64)
    if not hidden:
        logits = model(image)[0]
        bias = model.layers[1].bias.detach()
        expected = (model.class_weight_map() * image[0, 0].numpy()).sum() + float(bias[1] - bias[0])
        assert float(logits[1] - logits[0]) == pytest.approx(expected, rel=1e-4)
    path = save_weight_map(model.class_weight_map(), tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_hidden_width_is_refused() -> None:
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        build_model("splash-fnn", SPEC, hidden=-1)


def test_audit_reports_the_metric_and_both_attacks() -> None:
    """The zero-hidden FNN is one linear layer: its batch-1 gradient gives the image exactly."""
    result = audit(model="splash-fnn", dataset="splash", samples=1, attacks="layerwise,inverting-gradients")
    assert result.security_report is not None and result.security_report.score == 0
    assert result.architecture.end_to_end_deficit == 0
    psnr = dict(zip(result.summary["attack"], result.summary["mean_psnr"], strict=True))
    assert psnr["layerwise"] > 60
    assert np.isfinite(psnr["inverting-gradients"])
