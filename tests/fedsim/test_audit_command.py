"""`fedsim audit` and the federated auditor, on real photo crops."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from audits.scoring.engine import AUDIT_COLUMNS
from fedsim.cli import cli
from models import InputSpec, build_model


def _audit(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["audit", *args])
    return result.exit_code, result.output


def test_audit_of_cnn6_recovers_photos_and_reports_full_rank(tmp_path: Path) -> None:
    code, output = _audit(
        ["--model", "cnn6", "--data", "photos", "--samples", "2", "--out", str(tmp_path / "a")]
    )
    assert code == 0, output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["security"]["score"] == 0
    assert [layer["deficit"] for layer in report["security"]["layers"]] == [0] * 7
    layerwise = report["attacks"]["layerwise"]
    assert (
        layerwise["reconstructed"] == 2 and layerwise["mean_psnr"] >= 40 and layerwise["label_score"] == 1.0
    )
    assert (tmp_path / "a" / "reconstructions.png").stat().st_size > 5_000
    with open(tmp_path / "a" / "audit.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == AUDIT_COLUMNS  # the federated audit.csv's columns
    assert [r["sample"] for r in rows] == [str(i) for i in report["settings"]["samples"]]
    assert {(r["threat"], r["rank_score"], r["round"]) for r in rows} == {
        ("fedsgd-b1 (exact gradient)", "0.0", "")
    }
    assert "score (COPA" in output and "layerwise" in output


def test_audit_of_cnn6_d_reports_the_deficit_and_the_attack_fails(tmp_path: Path) -> None:
    code, output = _audit(["--model", "cnn6-d", "--samples", "3", "--out", str(tmp_path / "d")])
    assert code == 0, output
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    second_conv = report["security"]["layers"][1]
    assert (second_conv["unknowns"], second_conv["rank"], second_conv["deficit"]) == (4332, 4052, 280)
    assert report["security"]["score"] > 0
    assert report["attacks"]["layerwise"]["mean_psnr"] < 15  # single crops reach up to ~18 dB
    assert {row["rank_score"] for row in report["rows"]} == {float(report["security"]["score"])}
    assert all("rank-deficient layer 1: not uniquely invertible" in row["note"] for row in report["rows"])


def test_audit_loads_run_checkpoints_and_rejects_mismatched_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = build_model("mlp", InputSpec((1, 8, 8), 10))
    save_file(trained.state_dict(), tmp_path / "mlp.safetensors")
    code, output = _audit(
        ["--model", "mlp", "--data", "digits", "--weights", str(tmp_path / "mlp.safetensors"),
         "--attacks", "layerwise,analytic-fc", "--samples", "2", "--out", str(tmp_path / "m")]
    )  # fmt: skip
    assert code == 0, output
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["attacks"]["analytic-fc"]["mean_psnr"] >= 60  # exact for an FC layer with bias
    code, output = _audit(["--model", "cnn6", "--weights", str(tmp_path / "mlp.safetensors")])
    assert code == 2 and output.startswith("error: weights") and "do not fit this model" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attacks", "telepathy"], "unknown attack(s) telepathy; choose from"),
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--weights", "/nonexistent.safetensors"], "cannot read weights"),
        (["--image-size", "2"], "image size 2 is out of range; pass 4 to 256"),
    ],
)
def test_audit_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    code, output = _audit([*args, "--out", str(tmp_path / "x")])
    assert code == 2 and output.startswith("error: ") and message in output
    assert not (tmp_path / "x").exists()


def test_audit_to_an_unwritable_folder_fails_before_attacking(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, output = _audit(["--model", "mlp", "--data", "digits", "--out", str(blocker / "audit")])
    assert code == 2 and output.startswith(f"error: cannot write the audit to {blocker / 'audit'}")
