"""One report per architecture: every registered model gets one, and `fedsim audit` writes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audits.architecture.report import ObservationNoise, architecture_report
from audits.architecture.standalone import audit_model
from fedsim.cli import cli
from models import InputSpec, UnsupportedInputError, available_models, build_model
from tests.support.optional import require_minilm, require_smollm2

DIGITS = InputSpec((1, 8, 8), 10)
# Pretrained families read only their tokenizer's ids: (vocabulary size, the skip naming its install).
PRETRAINED = {"minilm": (30522, require_minilm), "smollm2": (49152, require_smollm2)}


def _pretrained_report(name: str) -> None:
    """A frozen pretrained base: no end-to-end analysis (too large, and it says so) but a
    statement of what its update exposes, naming why the token-set attack learns nothing."""
    size, require = PRETRAINED[name]
    require()
    torch.manual_seed(0)
    model = build_model(name, InputSpec.tokens(12, size, 6, name))
    x = torch.randint(1, size, (1, 12), generator=torch.Generator().manual_seed(1))
    report = architecture_report(model, x, torch.tensor([3]), ObservationNoise(1e-3))
    assert report.identifiability is None and report.identifiability_note.startswith("not computed")
    assert "M trained" in report.identifiability_note and report.bound is None
    assert "token-set attack reveals no tokens" in report.exposure
    table = report.to_table()
    assert f"what the update exposes: {report.exposure}" in table.splitlines()
    assert report.regions is not None and not report.regions.applicable
    assert json.loads(json.dumps(report.to_dict()))["exposure"] == report.exposure


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_gets_a_report(name: str) -> None:
    if name in PRETRAINED:
        _pretrained_report(name)
        return
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    try:
        model = build_model(name, DIGITS)
        x = torch.rand(1, 1, 8, 8, generator=generator)
    except UnsupportedInputError:  # a token-only family (e.g. ltw): a short text, a small vocabulary
        model = build_model(name, InputSpec.tokens(12, 40, 10))
        x = torch.randint(0, 40, (1, 12), generator=generator)
    report = architecture_report(model, x, torch.tensor([3]), ObservationNoise(1e-3))
    if not model.trained_by_gradients:  # no gradient to analyse: says so, and measures what it sends
        assert report.identifiability is None and "not trained by gradients" in report.identifiability_note
        assert report.disclosures and report.disclosures[0].psnr is not None
        json.dumps(report.to_dict())
        return
    assert report.identifiability is not None, report.identifiability_note
    assert report.end_to_end_deficit is not None and report.end_to_end_deficit >= 0
    assert report.bound is not None
    if model.spec.modality == "tokens":  # an MSE bound on the embedded input, no pixel peak for a PSNR
        assert report.psnr_ceiling is None and math.isfinite(report.bound.mse_floor)
    else:
        assert report.psnr_ceiling is not None and math.isfinite(report.psnr_ceiling)
    if report.layerwise is None:  # a table, or why there is none
        assert report.layerwise_note
    else:  # a partial table names what it left to the end-to-end analysis
        assert bool(report.layerwise.untreated) == report.layerwise_note.startswith("partial:")
    json.dumps(report.to_dict())  # plain enough for report.json
    table = report.to_table()
    assert "end-to-end J" in table and "PSNR ceiling" in table
    # Linear regions: counted for every piecewise-linear model, "not applicable" for the rest.
    assert report.regions is not None, report.regions_note
    assert report.regions.applicable == (name not in {"lenet", "splash-fnn", "text-dnn", "ltw", "cloze"})
    assert report.regions.line() in table.splitlines()


def test_noise_the_attacks_face_sets_the_ceiling_and_reaches_the_attacks() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", DIGITS)
    rng = np.random.default_rng(0)
    inputs = rng.random((2, 1, 8, 8)).astype(np.float32)
    labels = np.array([1, 4])
    quiet = audit_model(model, inputs, labels, ["analytic-fc"], sample_ids=[10, 11])
    noisy = audit_model(model, inputs, labels, ["analytic-fc"], sample_ids=[10, 11], gradient_noise=1e-3)
    again = audit_model(model, inputs, labels, ["analytic-fc"], sample_ids=[10, 11], gradient_noise=1e-3)
    assert quiet.architecture.noise.sigma == 0 and "float32 rounding" in quiet.architecture.noise.bound_at
    assert not quiet.architecture.identifiability.whitened  # one J for the deficit and the bound
    assert 0 < quiet.architecture.bound.sigma < 1e-6  # float32 rounding at lr 0.1, as a uniform RMS
    assert noisy.architecture.psnr_ceiling < quiet.architecture.psnr_ceiling
    assert {r.threat for r in noisy.rows} == {"fedsgd-b1 (exact gradient + N(0, 0.001^2))"}
    assert [r.psnr for r in noisy.rows] == [r.psnr for r in again.rows]  # seeded noise
    (outcome,) = noisy.architecture.attacks
    assert outcome.attack == "analytic-fc" and outcome.psnr == noisy.rows[0].psnr
    assert outcome.psnr < quiet.architecture.attacks[0].psnr
    # Only attacks that faced the ceiling's noise get a verdict.
    assert outcome.beats_ceiling is not None and quiet.architecture.attacks[0].beats_ceiling is None
    assert noisy.architecture.bound_sample == 10


def test_fedsim_audit_writes_the_architecture_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["audit", "--model", "convnet-maxpool", "--dataset", "digits", "--attacks", "layerwise,analytic-fc",
         "--samples", "2", "--gradient-noise", "0.01", "--out", str(tmp_path / "a")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    architecture = report["architecture"]
    assert architecture["noise"]["sigma"] == 0.01 and report["settings"]["gradient_noise"] == 0.01
    assert architecture["end_to_end_deficit"] == 0 and architecture["psnr_ceiling"] > 0
    assert [a["attack"] for a in architecture["attacks"]] == ["layerwise", "analytic-fc"]
    assert "end-to-end J" in result.output and "PSNR ceiling" in result.output
    # The linear regions on the segment between the two samples, next to the security score.
    regions = architecture["linear_regions"]
    assert regions["applicable"] and regions["ops"] == {"relu": 1536, "max_pool2d": 384}
    assert len(regions["line_regions"]) == 1 and regions["plane_regions"] == []  # a plane needs 3 samples
    assert 1 < regions["line_regions"][0] <= regions["bound"]["line"]
    assert "linear regions (1536 relu, 384 max_pool2d units)" in result.output
